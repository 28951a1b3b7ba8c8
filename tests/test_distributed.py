"""Data-parallel attribution: 2-process torchrun (gloo) equals one process; a killed run resumes."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

RUNNER = Path(__file__).parent / "helpers" / "dist_runner.py"
WORDS = "the a of is in capital France Paris Spain Madrid Italy Rome city language river big small old new".split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 6)) for i in range(20)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist_model")
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, " ": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "texts.json").write_text(json.dumps(TEXTS))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single(model_dir: Path, output: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(RUNNER), str(model_dir), str(model_dir / "texts.json"), str(output), *extra]
    return subprocess.Popen(command, env=_env())


def _torchrun(model_dir: Path, output: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(RUNNER), str(model_dir),
               str(model_dir / "texts.json"), str(output)]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torchrun_two_processes_equal_single_process(model_dir, tmp_path):
    single = _single(model_dir, tmp_path / "single.jsonl")
    assert single.wait(timeout=300) == 0
    result = _torchrun(model_dir, tmp_path / "ddp.jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = _records(tmp_path / "single.jsonl"), _records(tmp_path / "ddp.jsonl")
    assert [r["index"] for r in got] == list(range(len(TEXTS)))
    assert got == expected
    parts = sorted(p.name for p in tmp_path.glob("ddp.jsonl.part-*.jsonl"))
    assert parts == ["ddp.jsonl.part-0.jsonl", "ddp.jsonl.part-1.jsonl"]


def test_killed_run_resumes_without_duplicates(model_dir, tmp_path):
    reference = _single(model_dir, tmp_path / "reference.jsonl", "--batch-size", "1")
    assert reference.wait(timeout=300) == 0
    output = tmp_path / "resumed.jsonl"
    part = tmp_path / "resumed.jsonl.part-0.jsonl"
    victim = _single(model_dir, output, "--batch-size", "1", "--delay", "0.3")
    deadline = time.time() + 240
    while time.time() < deadline and (not part.exists() or len(part.read_text().splitlines()) < 6):
        time.sleep(0.05)
    victim.kill()
    victim.wait()
    finished_before = len(part.read_text().splitlines())
    assert 6 <= finished_before < len(TEXTS), "the run must be killed halfway"
    assert not output.exists()
    assert _single(model_dir, output, "--batch-size", "1").wait(timeout=300) == 0
    got = _records(output)
    assert [r["index"] for r in got] == list(range(len(TEXTS)))
    assert got == _records(tmp_path / "reference.jsonl")
    resumed = [json.loads(line)["index"] for line in part.read_text().splitlines()]
    assert len(resumed) == len(set(resumed)) == len(TEXTS)


def test_bad_arguments(model_dir, tmp_path):
    from fastgim.distributed import attribute_dataset

    with pytest.raises(ValueError, match="batch_size"):
        attribute_dataset(None, None, ["x"], tmp_path / "o.jsonl", batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        attribute_dataset(None, None, [], tmp_path / "o.jsonl")
