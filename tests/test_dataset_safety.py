"""attribute_dataset never loses or invents data: torn part files, stale results, input checks before compute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastgim.distributed import attribute_dataset

TEXTS = [f"prompt number {i}" for i in range(6)]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _worker(model, tokenizer, texts, kwargs):
    return [{"text": text, "scores": [float(len(text))], "kwargs": sorted(kwargs)} for text in texts]


def _refusing_worker(*_args):
    raise AssertionError("the worker must not run: the inputs are checked before any compute")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(output: Path, texts=TEXTS, model=None, **kwargs):
    return attribute_dataset(model or _model(), None, texts, output, batch_size=2, explain_fn=_worker,
                             method="test", **kwargs)


def test_resume_cuts_a_hand_made_torn_line(tmp_path):
    output = tmp_path / "out.jsonl"
    expected = _run(tmp_path / "reference.jsonl")
    part = output.with_name("out.jsonl.part-0.jsonl")
    _run(output, texts=TEXTS)  # a finished run, then pretend the writer died on record 5
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2])
    output.unlink()
    got = _run(output)
    assert got == expected
    assert [r["index"] for r in _lines(part)] == [0, 1, 2, 3, 4, 5]  # every line parses, nothing twice


CHILD = textwrap.dedent("""
    import sys, torch
    from fastgim.distributed import attribute_dataset
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    def worker(model, tokenizer, texts, kwargs):
        return [{"text": text, "scores": [float(len(text))], "kwargs": sorted(kwargs),
                 **({"padding": "x" * (48 << 20)} if text.endswith("3") else {})} for text in texts]
    attribute_dataset(model, None, TEXTS, sys.argv[1], batch_size=2, explain_fn=worker, method="test")
""")


def _kill_during_a_write(output: Path) -> bool:
    """Run the child and SIGKILL it while it writes the 48 MiB record; True when the last line is torn."""
    part = output.with_name(output.name + ".part-0.jsonl")
    child = subprocess.Popen([sys.executable, "-c", f"TEXTS = {TEXTS!r}\n{CHILD}", str(output)],
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if part.exists() and part.stat().st_size > (1 << 20):  # inside the big record's write
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the child must be killed, not finish"
    return not part.read_bytes().endswith(b"\n")


def test_resume_after_a_real_sigkill_during_a_write(tmp_path):
    torn = False
    for attempt in range(3):  # the kill races the kernel's copy; a torn tail is checked, not assumed
        output = tmp_path / f"killed-{attempt}.jsonl"
        if _kill_during_a_write(output):
            torn = True
            break
    assert torn, "could not kill the writer mid-record in 3 attempts"
    got = attribute_dataset(_model(), None, TEXTS, output, batch_size=2, explain_fn=_worker, method="test")
    assert [r["index"] for r in got] == list(range(len(TEXTS)))
    part = output.with_name(output.name + ".part-0.jsonl")
    assert sorted(r["index"] for r in _lines(part)) == list(range(len(TEXTS)))


@pytest.mark.parametrize("change", ["texts", "settings", "method", "model"])
def test_a_different_run_on_the_same_output_is_refused(tmp_path, change):
    output = tmp_path / "out.jsonl"
    _run(output, gate_scale=0.5)
    kwargs = {"texts": TEXTS, "model": _model(), "gate_scale": 0.5}
    if change == "texts":
        kwargs["texts"] = [*TEXTS[:-1], "another prompt"]
    elif change == "settings":
        kwargs["gate_scale"] = None
    elif change == "model":
        kwargs["model"] = _model(seed=1)
    before = output.read_text()
    with pytest.raises(ValueError, match=f"different run.*{change}.*To start over, delete"):
        if change == "method":
            attribute_dataset(_model(), None, TEXTS, output, batch_size=2, explain_fn=_refusing_worker,
                              gate_scale=0.5)
        else:
            _run(output, **kwargs)
    assert output.read_text() == before
    assert _run(output, gate_scale=0.5) == [json.loads(line) for line in before.splitlines()]  # same run resumes


def test_parts_without_a_manifest_are_refused(tmp_path):
    output = tmp_path / "out.jsonl"
    _run(output)
    output.with_name("out.jsonl.manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest"):
        _run(output)


def test_inputs_are_checked_before_any_compute(tmp_path):
    with pytest.raises(TypeError, match="single str"):
        attribute_dataset(_model(), None, "one prompt", tmp_path / "o.jsonl", explain_fn=_refusing_worker)
    with pytest.raises(ValueError, match="is a directory"):
        attribute_dataset(_model(), None, TEXTS, tmp_path, explain_fn=_refusing_worker)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        attribute_dataset(_model(), None, ["a", 3], tmp_path / "o.jsonl", explain_fn=_refusing_worker)
    assert not list(tmp_path.iterdir())


def _tiny_lm() -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    words = "the a of is capital France Paris".split()
    vocab = {"<pad>": 0, "<unk>": 1, " ": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_an_int_target_token_id_applies_to_every_prompt(tmp_path):
    model, tokenizer = _tiny_lm()
    texts = ["the capital of France is", "Paris is"]
    records = attribute_dataset(model, tokenizer, texts, tmp_path / "o.jsonl", target_token_id=5)
    assert [r["target_token_id"] for r in records] == [5, 5]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        attribute_dataset(model, tokenizer, texts, tmp_path / "p.jsonl", target_token_id=500)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"softmax_temperature": float("nan")}, ValueError, "softmax_temperature must be finite"),
    ({"baseline_token_id": 500}, ValueError, "outside the model's vocabulary"),
    ({"target_token_id": 1.5}, TypeError, "target_token_id must be an integer token id"),
])
def test_explain_arguments_are_checked_before_any_compute(tmp_path, kwargs, error, message):
    model, tokenizer = _tiny_lm()
    with pytest.raises(error, match=message):
        attribute_dataset(model, tokenizer, ["the capital"], tmp_path / "o.jsonl", **kwargs)
    assert not list(tmp_path.iterdir()), "nothing written"
