"""Record inteprelens 0.2.1's ``utils.helpers`` / ``utils.formatters`` / pretokenized sentence spans outputs.

For tests/test_inteprelens_helpers_parity.py. Run ONCE in an environment holding the real inteprelens
(not fastgim's), e.g.::

    python -m venv /tmp/ilens && /tmp/ilens/bin/pip install torch==2.13.0 inteprelens==0.2.1
    /tmp/ilens/bin/python scripts/record_inteprelens_helpers_fixture.py python/fastgim/default_model tests/fixtures

Writes ``inteprelens_0_2_1_helpers.pt``: a dict of tensors, numbers, strings and lists that
``torch.load(..., weights_only=True)`` reads. The fixed or seeded inputs, and how each function is
called, are shared with the test (tests/helpers/inteprelens_helper_cases.py). ``load_math_dataset``
runs on a small table handed out by a stand-in ``datasets.load_dataset`` (no network; inteprelens has
no other way in). CUDA / MPS availability is simulated for ``get_device`` / ``check_device``.
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import inteprelens_helper_cases as cases  # noqa: E402


def signature_of(fn) -> list[list[str]]:
    """Each parameter as ``[name, kind, repr(default)]``."""
    return [[p.name, p.kind.name, repr(p.default)] for p in inspect.signature(fn).parameters.values()]


def record_helpers(helpers) -> dict:
    out: dict = {"format_memory_size": [helpers.format_memory_size(*args) for args in cases.MEMORY_SIZES]}
    draws = []
    for seed in cases.SEEDS:
        helpers.seed_all(seed)
        draws.append(cases.seeded_draws())
    out["seed_all"] = draws
    out["cudnn"] = [torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark]
    out["cross_entropy"] = [helpers.cross_entropy(logits, target, reduction=reduction)
                            for logits, target, reduction in cases.cross_entropy_inputs()]
    out["logmeanexp"] = [helpers.logmeanexp(x, dim) for x, dim in cases.logmeanexp_inputs()]
    out["to_long_df"] = [cases.frame_record(helpers.to_long_df(*args, **kwargs))
                         for args, kwargs in cases.long_df_inputs()]
    out["get_device"], out["check_device"] = cases.run_devices(helpers)
    return out


def record_formatters(formatters, model_dir: str) -> dict:
    from transformers import AutoTokenizer

    def tokenizer():  # a fresh one per call: inteprelens adds its separator token to the tokenizer it gets
        return AutoTokenizer.from_pretrained(model_dir)

    out: dict = {"permutations": [cases.run_permutations(formatters, i) for i in range(len(cases.PERMUTATION_CASES))]}
    out["assign_split"] = [formatters.assign_split(df, n, f, seed)["split"].tolist()
                           for df, n, f, seed in cases.assign_split_inputs()]
    out["create_prompts"] = [cases.frame_record(formatters.create_prompts(**kwargs))
                             for kwargs in cases.create_prompts_inputs()]
    out["create_fewshot_dataset"] = [cases.run_fewshot(formatters, tokenizer(), i)
                                     for i in range(len(cases.FEWSHOT_CASES))]
    hub = types.ModuleType("datasets")
    hub.load_dataset = lambda name, split: cases.math_rows()
    sys.modules["datasets"] = hub
    out["load_math_dataset"] = [cases.run_math(formatters, tokenizer(), i) for i in range(len(cases.MATH_CASES))]
    hub.load_dataset = lambda name, split: cases.math_rows(30)
    out["load_math_rounding"] = cases.frame_record(formatters.load_math_dataset(tokenizer(), **cases.ROUNDING_CASE)[0])
    return out


def main(model_dir: str, out_dir: str) -> None:
    from importlib.metadata import version

    from inteprelens.utils import formatters, helpers
    from inteprelens.utils import sentence_spans as spans
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    record = {
        "inteprelens_version": version("inteprelens"), "torch_version": str(torch.__version__),
        "numpy_version": np.__version__, "tie_order": cases.tie_order(),
        "signatures": {name: signature_of(getattr(module, name)) for module, names in
                       [(helpers, cases.HELPER_NAMES), (formatters, cases.FORMATTER_NAMES),
                        (spans, ["get_sentence_token_spans_from_pretokenized"])] for name in names},
        "helpers": record_helpers(helpers),
        "formatters": record_formatters(formatters, model_dir),
        "pretokenized": [list(spans.get_sentence_token_spans_from_pretokenized(sentences, tokenizer, special))
                         for sentences, special in cases.PRETOKENIZED_CASES],
    }
    path = Path(out_dir) / "inteprelens_0_2_1_helpers.pt"
    torch.save(record, path)
    torch.load(path, weights_only=True)  # what the test does
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
