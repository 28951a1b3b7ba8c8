"""inteprelens 0.2.1's ``utils.helpers``, ``utils.formatters`` and pretokenized sentence spans on fastgim.

The reference values were recorded ONCE with the real inteprelens by
``scripts/record_inteprelens_helpers_fixture.py`` (``tests/fixtures/inteprelens_0_2_1_helpers.pt``) on the
shared inputs of ``tests/helpers/inteprelens_helper_cases.py``; inteprelens is not needed here. The maths
is the same on both sides, so everything is compared exactly (tensors with ``torch.equal``, frames
column by column with their dtypes, printed text character for character). Bad input must raise a
clear error where inteprelens fails obscurely or answers silently wrong.
"""

from __future__ import annotations

import inspect
import random
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import inteprelens_helper_cases as cases
from transformers import AutoTokenizer

import fastgim.fewshot
import fastgim.sentence_spans
import fastgim.utils
from fastgim.chg_compat import PromptTokenizer
from fastgim.default_model import DEFAULT_MODEL_DIR
from fastgim.inteprelens.utils import formatters, helpers
from fastgim.inteprelens.utils import sentence_spans as spans

RECORD = torch.load(Path(__file__).parent / "fixtures" / "inteprelens_0_2_1_helpers.pt", weights_only=True)
HELPERS, FORMATTERS = RECORD["helpers"], RECORD["formatters"]
# inteprelens and fastgim sort with pandas' default (numpy's unstable quicksort): equal keys come out in
# an order that depends on numpy's CPU dispatch, so cases with ties are compared where it matches the recording's
SAME_TIE_ORDER = cases.tie_order() == RECORD["tie_order"]
# Keyword parameters fastgim adds (after inteprelens' own, with defaults): a documented option each
SIGNATURE_EXTENSIONS = {"load_math_dataset": [["split_rounding", "POSITIONAL_OR_KEYWORD", "'exact'"]]}
MIRRORED = ([(helpers, fastgim.utils, name) for name in cases.HELPER_NAMES]
            + [(formatters, fastgim.fewshot, name) for name in cases.FORMATTER_NAMES]
            + [(spans, fastgim.sentence_spans, "get_sentence_token_spans_from_pretokenized")])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.fixture
def restore_global_state():
    """seed_all and the option orderings touch process-wide generators and cuDNN flags: put them back."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@pytest.fixture
def hub(monkeypatch):
    """A stand-in ``datasets`` package whose ``load_dataset`` serves :func:`cases.math_rows` (no network)."""
    module = types.ModuleType("datasets")
    module.requests = []

    def load_dataset(name, split):
        module.requests.append((name, split))
        return cases.math_rows()

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def assert_same(actual, recorded) -> None:
    """Equal, tensors with ``torch.equal`` (same dtype), nested in lists / tuples / dicts."""
    if isinstance(recorded, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == recorded.dtype
        assert torch.equal(actual, recorded), (actual, recorded)
    elif isinstance(recorded, (list, tuple)):
        assert len(actual) == len(recorded)
        for a, r in zip(actual, recorded):
            assert_same(a, r)
    else:
        assert actual == recorded


# --- names, module paths, signatures ---------------------------------------------------------------------------

@pytest.mark.parametrize("mirror,home,name", MIRRORED, ids=[name for _, _, name in MIRRORED])
def test_mirror_aliases_fastgim_function_with_inteprelens_signature(mirror, home, name):
    function = getattr(mirror, name)
    assert function is getattr(home, name) and name in mirror.__all__
    signature = [[p.name, p.kind.name, repr(p.default)] for p in inspect.signature(function).parameters.values()]
    assert signature == RECORD["signatures"][name] + SIGNATURE_EXTENSIONS.get(name, [])


# --- helpers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(len(cases.MEMORY_SIZES)))
def test_format_memory_size(case):
    assert helpers.format_memory_size(*cases.MEMORY_SIZES[case]) == HELPERS["format_memory_size"][case]


@pytest.mark.parametrize("unit", ["PB", "bytes", 3])
def test_format_memory_size_rejects_unknown_unit(unit):
    with pytest.raises(ValueError, match="must be one of"):
        helpers.format_memory_size(2048, unit=unit)


@pytest.mark.parametrize("case", range(len(cases.SEEDS)))
def test_seed_all_reproduces_inteprelens_draws(case, restore_global_state):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    helpers.seed_all(cases.SEEDS[case])
    assert_same(cases.seeded_draws(), HELPERS["seed_all"][case])
    assert [torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark] == HELPERS["cudnn"]


@pytest.mark.parametrize("case", range(len(cases.cross_entropy_inputs())))
def test_cross_entropy(case):
    logits, target, reduction = cases.cross_entropy_inputs()[case]
    result = helpers.cross_entropy(logits, target, reduction=reduction)
    assert_same(result, HELPERS["cross_entropy"][case])
    reference = torch.nn.functional.cross_entropy(logits.double().reshape(-1, logits.shape[-1]),
                                                  target.reshape(-1), reduction=reduction)
    tolerance = 2e-2 if logits.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(result.double(), reference.reshape(result.shape), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (2, 3, 4, 7)])
def test_cross_entropy_probability_targets_use_the_last_axis(shape):
    gen = torch.Generator().manual_seed(3)
    logits, probs = torch.randn(shape, generator=gen), torch.rand(shape, generator=gen).softmax(-1)
    expected = -(probs * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(helpers.cross_entropy(logits, probs, reduction="none"), expected)


def test_cross_entropy_unbatched_logits():
    logits = torch.randn(11, generator=torch.Generator().manual_seed(4))
    assert torch.equal(helpers.cross_entropy(logits, torch.tensor(3)), -logits.log_softmax(-1)[3])


@pytest.mark.parametrize("target_shape", [(2, 5, 1), (5, 2), (2,)])
def test_cross_entropy_rejects_misshaped_target(target_shape):
    with pytest.raises(ValueError, match="target shape"):
        helpers.cross_entropy(torch.randn(2, 5, 11), torch.zeros(target_shape, dtype=torch.long))


@pytest.mark.parametrize("case", range(len(cases.logmeanexp_inputs())))
def test_logmeanexp(case):
    x, dim = cases.logmeanexp_inputs()[case]
    result = helpers.logmeanexp(x, dim)
    assert_same(result, HELPERS["logmeanexp"][case])
    reference = x.double().exp().mean(dim).log()
    tolerance = {torch.bfloat16: 3e-2, torch.float16: 3e-3}.get(x.dtype, 1e-6)
    torch.testing.assert_close(result.double(), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("case", range(len(cases.long_df_inputs())))
def test_to_long_df(case):
    args, kwargs = cases.long_df_inputs()[case]
    assert cases.frame_record(helpers.to_long_df(*args, **kwargs)) == HELPERS["to_long_df"][case]


def test_to_long_df_bfloat16_tensor():
    masks = torch.rand(2, 3, generator=torch.Generator().manual_seed(5))
    expected = helpers.to_long_df(masks.bfloat16().float(), ["layer", "head"])
    pd.testing.assert_frame_equal(helpers.to_long_df(masks.bfloat16(), ["layer", "head"]), expected)


@pytest.mark.parametrize("args,kwargs,message", [
    ((torch.zeros(2, 3), ["layer"]), {}, "one name per dimension"),
    ((torch.zeros(2, 3, 4), ["a", "b"], ["x", "y"]), {}, "last axis has 4"),
    ((torch.zeros(2, 3), ["layer", "value"]), {}, "repeat"),
    # inteprelens repeats these 8 values 3 times each and silently pairs them with unrelated rows
    ((torch.zeros(2, 3, 4), ["a", "b", "c"]), {"extra": np.arange(8)}, "prefix"),
    ((torch.zeros(3, 4), ["a", "b"]), {"extra": np.zeros((4, 3))}, "prefix"),
])
def test_to_long_df_rejects_bad_shapes(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        helpers.to_long_df(*args, **kwargs)


def test_get_device_and_check_device_under_simulated_accelerators():
    devices, printed = cases.run_devices(helpers)
    assert devices == HELPERS["get_device"]
    assert printed == HELPERS["check_device"]


# --- formatters ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(len(cases.PERMUTATION_CASES)))
def test_generate_prompt_permutations(case, restore_global_state):
    assert cases.run_permutations(formatters, case) == FORMATTERS["permutations"][case]


@pytest.mark.parametrize("options", [{"a": 0, "b": 0}, {"a": 1, "b": 1, "c": 0}, {"a": 2, "b": 0}])
def test_generate_prompt_permutations_needs_one_correct_option(options):
    with pytest.raises(ValueError, match="exactly one answer correct"):
        formatters.generate_prompt_permutations("Q?", options)


def test_generate_prompt_permutations_rejects_more_options_than_letters():
    with pytest.raises(ValueError, match="at most 26"):
        formatters.generate_prompt_permutations("Q?", {str(i): int(i == 0) for i in range(27)}, 1)


@pytest.mark.parametrize("case", range(len(cases.assign_split_inputs())))
def test_assign_split(case):
    if case in cases.TIE_CASES["assign_split"] and not SAME_TIE_ORDER:
        pytest.skip("equally long questions at the example cut: numpy orders ties differently on this CPU than on "
                    "the recording's, so inteprelens itself picks other examples here")
    df, num_examples, f_validation, seed = cases.assign_split_inputs()[case]
    original = df.copy()
    result = formatters.assign_split(df, num_examples, f_validation, seed)
    assert result["split"].tolist() == FORMATTERS["assign_split"][case]
    pd.testing.assert_frame_equal(df, original)  # the caller's frame is not modified
    assert result.groupby("question")["split"].nunique().max() == 1


def _tied(lengths: list[int]) -> bool:
    return len(set(lengths)) < len(lengths)


def test_cases_outside_tie_cases_sort_without_ties(tokenizer):
    """The recorded cases compare exactly on any CPU because no sort key repeats (see TIE_CASES)."""
    frames = [df for i, (df, *_) in enumerate(cases.assign_split_inputs()) if i not in cases.TIE_CASES["assign_split"]]
    for df in frames:
        groups = df.groupby("question")
        extra = (groups["options"].agg(lambda s: sum(map(len, s))) if "options" in df
                 else groups["target"].agg(lambda s: len(s.iloc[0])))
        assert not _tied((extra + extra.index.str.len()).tolist())
    for kwargs in cases.FEWSHOT_CASES:
        pairs = dict(zip(kwargs["questions"], kwargs["targets"]))  # first target of each question
        assert not _tied([len(q) + (2 * len("\n".join(f"A. {o}" for o in t)) if isinstance(t, dict) else len(t))
                          for q, t in pairs.items()])
    for count in (16, 30):
        table = pd.DataFrame(cases.math_rows(count))
        table = table[table["expected_answer"].str.len() > 0].drop_duplicates("problem")
        tokenize = PromptTokenizer(tokenizer).tokenize
        assert not _tied([len(tokenize(p, s)[0]) for p, s in zip(table["problem"], table["generated_solution"])])
        assert not _tied([len(p) + len(s) for p, s in zip(table["problem"], table["generated_solution"])])
    assert _tied(cases.frq_frame(ties=True)["question"].str.len().tolist())


@pytest.mark.parametrize("df,kwargs,message", [
    (pd.DataFrame({"question": ["a"]}), {}, "either 'options' or 'target'"),
    (pd.DataFrame({"prompt": ["a"], "target": ["b"]}), {}, "'question' column"),
    (cases.frq_frame(), {"num_examples": -1}, "num_examples >= 0"),
    (cases.frq_frame(), {"num_examples": 2, "f_validation": 1.5}, "f_validation <= 1"),
])
def test_assign_split_rejects_bad_input(df, kwargs, message):
    with pytest.raises(ValueError, match=message):
        formatters.assign_split(df, **{"num_examples": 2, **kwargs})


@pytest.mark.parametrize("case", range(len(cases.create_prompts_inputs())))
def test_create_prompts(case):
    kwargs = cases.create_prompts_inputs()[case]
    result = cases.frame_record(formatters.create_prompts(**kwargs))
    recorded = FORMATTERS["create_prompts"][case]
    if not recorded["columns"]:  # inteprelens returns a frame without columns when there is no row
        assert result["data"] == [[], [], []] and result["columns"] == ["split", "prompt", "target"]
    else:
        assert result == recorded


def test_create_prompts_needs_a_split_column():
    with pytest.raises(ValueError, match="assign_split adds 'split'"):
        formatters.create_prompts(cases.frq_frame(), 1, cases.format_example)


@pytest.mark.parametrize("case", range(len(cases.FEWSHOT_CASES)))
def test_create_fewshot_dataset(case, tokenizer, restore_global_state):
    size = len(tokenizer)
    assert_same(cases.run_fewshot(formatters, tokenizer, case), FORMATTERS["create_fewshot_dataset"][case])
    assert len(tokenizer) == size  # unlike inteprelens, the separator token goes to a copy


@pytest.mark.parametrize("kwargs,message", [
    ({"questions": ["a?", "b?"], "targets": ["1"]}, "same length"),
    ({"questions": ["a?"], "targets": [{"x": 1}, {"y": 1}]}, "same length"),
    ({"questions": ["a?", "b?"], "targets": ["1", "2"]}, "reserves all 2 distinct questions"),
])
def test_create_fewshot_dataset_rejects_bad_input(kwargs, message, tokenizer):
    with pytest.raises(ValueError, match=message):
        formatters.create_fewshot_dataset(tokenizer, verbose=False, **kwargs)


def test_create_fewshot_dataset_needs_a_pad_token(tokenizer):
    unpadded = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    unpadded.pad_token = None
    with pytest.raises(ValueError, match="pad_token_id"):
        formatters.create_fewshot_dataset(unpadded, ["a?", "b?"], ["1", "2"], example_set_size=1, verbose=False)


@pytest.mark.parametrize("case", range(len(cases.MATH_CASES)))
def test_load_math_dataset_from_the_hub_name(case, tokenizer, hub):
    assert_same(cases.run_math(formatters, tokenizer, case), FORMATTERS["load_math_dataset"][case])
    assert hub.requests == [("nvidia/OpenMathInstruct-2", cases.MATH_CASES[case].get("split", "train_1M"))]


def _local_sources(tmp_path: Path) -> dict:
    rows = cases.math_rows()
    frame = pd.DataFrame(rows)
    frame.to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    sources = {"DataFrame": frame, "list": rows, "generator": (row for row in rows), "jsonl": str(tmp_path / "rows.jsonl")}
    if _has("pyarrow"):
        frame.to_parquet(tmp_path / "rows.parquet")
        sources["parquet"] = tmp_path / "rows.parquet"
    if _has("datasets"):
        import datasets

        sources["datasets.Dataset"] = datasets.Dataset.from_pandas(frame)
    return sources


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("source", ["DataFrame", "list", "generator", "jsonl", "parquet", "datasets.Dataset"])
def test_load_math_dataset_from_local_rows(source, tokenizer, tmp_path):
    sources = _local_sources(tmp_path)
    if source not in sources:
        pytest.skip(f"reading {source} needs the optional package behind it (pip install datasets / pyarrow)")
    result = cases.run_math(formatters, tokenizer, 0, dataset_name=sources[source])
    assert_same(result[:3], FORMATTERS["load_math_dataset"][0][:3])
    # the same printed lines but the first ("Loading dataset <name> ...")
    assert result[3].split("\n", 1)[1] == FORMATTERS["load_math_dataset"][0][3].split("\n", 1)[1]


@pytest.mark.skipif(not _has("pyarrow"), reason="the lengths cache is a parquet file: needs pyarrow")
def test_load_math_dataset_lengths_cache_round_trip(tokenizer, hub, tmp_path):
    cache = tmp_path / "lengths" / "math.parquet"
    first = cases.run_math(formatters, tokenizer, 0, lengths_cache_path=str(cache))
    assert cache.exists() and f"Saved lengths to {cache}" in first[3]
    assert list(pd.read_parquet(cache).columns) == ["problem", "solution", "answer", "length"]
    hub.load_dataset = None  # the second call must not load the dataset
    second = cases.run_math(formatters, tokenizer, 0, lengths_cache_path=str(cache))
    assert second[3].startswith(f"Loading precomputed lengths from {cache}")
    assert_same(second[:3], FORMATTERS["load_math_dataset"][0][:3])


@pytest.mark.parametrize("num_train,num_validation,problems", [(7, 15, 30), (7, 15, 20), (0, 3, 12), (5, 0, 12),
                                                                 (8, 31, 60)])
def test_load_math_dataset_gives_the_requested_split_sizes(num_train, num_validation, problems, tokenizer):
    table = pd.DataFrame(cases.math_rows(problems))
    kwargs = {**cases.ROUNDING_CASE, "num_train": num_train, "num_validation": num_validation}
    df = formatters.load_math_dataset(tokenizer, dataset_name=table, **kwargs)[0]
    rest = len(df)  # every selected problem but the one example
    expected = num_validation if rest == num_train + num_validation else rest * num_validation // (
        num_train + num_validation)
    assert (df["split"] == "validation").sum() == expected and (df["split"] == "train").sum() == rest - expected


def test_load_math_dataset_inteprelens_split_rounding(tokenizer):
    table = pd.DataFrame(cases.math_rows(30))
    recorded = FORMATTERS["load_math_rounding"]
    inteprelens = formatters.load_math_dataset(tokenizer, dataset_name=table, split_rounding="inteprelens",
                                               **cases.ROUNDING_CASE)[0]
    assert cases.frame_record(inteprelens) == recorded
    exact = formatters.load_math_dataset(tokenizer, dataset_name=table, **cases.ROUNDING_CASE)[0]
    exact_splits, inteprelens_splits = (dict(zip(df["prompt"], df["split"])) for df in (exact, inteprelens))
    assert exact_splits.keys() == inteprelens_splits.keys()  # zero-shot: one prompt per question
    moved = [p for p in exact_splits if exact_splits[p] != inteprelens_splits[p]]
    assert len(moved) == 1 and exact_splits[moved[0]] == "validation" and inteprelens_splits[moved[0]] == "train"
    assert (exact["split"] == "validation").sum() == 15
    with pytest.raises(ValueError, match="split_rounding must be"):
        formatters.load_math_dataset(tokenizer, dataset_name=table, split_rounding="floor", **cases.ROUNDING_CASE)


def test_load_math_dataset_offline_error_names_the_dataset(tokenizer, hub):
    def unreachable(name, split):
        raise ConnectionError("Couldn't reach the Hub (offline mode is enabled)")

    hub.load_dataset = unreachable
    with pytest.raises(RuntimeError, match=r"'nvidia/OpenMathInstruct-2'.*cache.*lengths_cache_path"):
        formatters.load_math_dataset(tokenizer, verbose=False)


def test_load_math_dataset_without_datasets_package(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install datasets.*DataFrame"):
        formatters.load_math_dataset(tokenizer, verbose=False)


@pytest.mark.parametrize("rows,kwargs,message", [
    ([{"problem": "p", "expected_answer": "1"}], {}, r"lacks \['generated_solution'\]"),
    (cases.math_rows(), {"num_train": 0, "num_validation": 0}, "positive sum"),
    (cases.math_rows(), {"num_train": 5, "num_validation": -1}, "num_validation >= 0"),
])
def test_load_math_dataset_rejects_bad_input(rows, kwargs, message, tokenizer):
    with pytest.raises(ValueError, match=message):
        formatters.load_math_dataset(tokenizer, dataset_name=rows, verbose=False, **kwargs)


def test_prompt_tokenizer_tokenize_does_not_truncate(tokenizer):
    # inteprelens' single-pair tokenize (used for load_math_dataset's lengths) keeps sequences past model_max_length
    ids, mask = PromptTokenizer(tokenizer).tokenize("word " * (tokenizer.model_max_length + 50), "end")
    assert len(ids) > tokenizer.model_max_length and mask[-1] and not mask[0]


# --- sentence spans --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(len(cases.PRETOKENIZED_CASES)))
def test_get_sentence_token_spans_from_pretokenized(case, tokenizer):
    sentences, special = cases.PRETOKENIZED_CASES[case]
    input_ids, result = spans.get_sentence_token_spans_from_pretokenized(sentences, tokenizer, special)
    assert_same([input_ids, result], RECORD["pretokenized"][case])
    for (start, end), sentence in zip(result, sentences):
        expected = tokenizer(sentence, add_special_tokens=special)["input_ids"] if sentence.strip() else []
        assert input_ids[start:end].tolist() == expected


def test_importing_the_mirror_modules_leaves_pandas_unimported():
    import subprocess

    code = ("import sys, fastgim.inteprelens.utils.formatters, fastgim.inteprelens.utils.helpers; "
            "print('pandas' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
