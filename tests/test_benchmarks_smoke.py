"""The benchmark suites stay working: their CPU sizes run (``--benchmark-disable``), the methods they
compare compute what they claim, OOMs become results, and the report renders tables, verdicts and plots."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import fastgim

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def explain_suite() -> ModuleType:
    return _load("fastgim_bench_explain", BENCHMARKS / "test_bench_explain.py")


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return _load("fastgim_bench_report", BENCHMARKS / "report.py")


@pytest.fixture(scope="module")
def bench_conftest() -> ModuleType:
    return _load("fastgim_bench_conftest", BENCHMARKS / "conftest.py")


# --------------------------------------------------------------------------- the suites run


def test_cpu_suites_run_and_report(tmp_path: Path, report: ModuleType) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it for the kernel tests; benchmarks run natively
    command = [sys.executable, "-m", "pytest", str(BENCHMARKS), "-q", "-p", "no:cacheprovider",
               "--benchmark-disable", "--results-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for suite, methods in (("attention", {"fastgim-torch", "fastgim-reference", "fastgim-plain", "sdpa"}),
                           ("explain", {"fastgim", "fastgim-checkpoint", "grad-x-input", "gim-explain", "naive-gim"})):
        payload = json.loads((tmp_path / f"{suite}-cpu.json").read_text())
        assert payload["format"] == report.FORMAT and payload["scale"] == "cpu"
        env_info = payload["environment"]
        assert env_info["device"] and env_info["date"]
        assert {"torch", "transformers", "triton", "fastgim"} <= {k for k, v in env_info["versions"].items() if v}
        rows = payload["rows"]
        if importlib.util.find_spec("gim") is None:
            methods.discard("gim-explain")
        assert {row["method"] for row in rows} == methods
        assert {row["length"] for row in rows} == {128, 512, 1024}
        for row in rows:
            assert row["status"] == "ok", row
            assert row["time_s"] > 0 and row["peak_bytes"] > 0 and row["peak_extra_bytes"] >= 0, row
    assert report.main(["--results-dir", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "## attention (cpu)" in readme and "## explain (cpu)" in readme and "| naive-gim |" in readme
    for name in ("attention-cpu-time", "attention-cpu-memory", "explain-cpu-time", "explain-cpu-memory"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name}.png)" in readme


# --------------------------------------------------------------------------- the methods are what they claim


def _tiny_model(explain_suite: ModuleType, dtype: torch.dtype, kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(dtype).eval()


def _ids(length: int) -> torch.Tensor:
    return torch.randint(1, 97, (1, length))


@pytest.mark.parametrize("length", [1, 13, 97])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_naive_gim_equals_fastgim(explain_suite: ModuleType, dtype: torch.dtype, kv_heads: int, length: int) -> None:
    model = _tiny_model(explain_suite, dtype, kv_heads)
    ids = _ids(length)
    before = model.config._attn_implementation
    naive = explain_suite.explain_naive_gim(model, ids)
    fused = explain_suite.explain_fastgim(model, ids)
    tolerance = {torch.float32: 2e-5, torch.float64: 1e-6}[dtype]  # explain returns float32
    torch.testing.assert_close(naive.double(), fused.double(), rtol=tolerance, atol=tolerance * naive.abs().max())
    plain = explain_suite.explain_grad_x_input(model, ids)
    if length > 1:  # GIM changes the gradient: the naive GIM is not plain gradient x input in disguise
        assert (naive - plain).abs().max() > 1e-3 * plain.abs().max()
    assert model.config._attn_implementation == before
    assert all(p.requires_grad for p in model.parameters()), "parameters' requires_grad not restored"
    assert not any("forward" in m.__dict__ for m in model.modules()), "a norm forward was left patched"


@pytest.mark.parametrize("length", [1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_x_input_is_gim_with_every_rule_off(explain_suite: ModuleType, dtype: torch.dtype, length: int) -> None:
    model = _tiny_model(explain_suite, dtype, 2)
    ids = _ids(length)
    plain = explain_suite.explain_grad_x_input(model, ids)
    off = fastgim.explain(model, ids, target_token_id=explain_suite.TARGET, baseline_token_id=explain_suite.BASELINE,
                          freeze_norm=None, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None,
                          gate_scale=None, up_scale=None)
    tolerance = {torch.float32: 2e-5, torch.float64: 1e-6}[dtype]  # explain returns float32
    torch.testing.assert_close(plain.double(), off.double(), rtol=tolerance, atol=tolerance * plain.abs().max())


def test_checkpoint_method_equals_plain_method(explain_suite: ModuleType) -> None:
    model = _tiny_model(explain_suite, torch.float32, 2)
    ids = _ids(50)
    torch.testing.assert_close(explain_suite.explain_fastgim(model, ids, checkpoint=True),
                               explain_suite.explain_fastgim(model, ids), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- OOM is a result


class _Config:
    def __init__(self) -> None:
        self.stash: dict = {}

    def getoption(self, name: str):
        return {"rounds": 2, "gpu": False}[name]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 99 bytes")])
def test_out_of_memory_is_recorded_not_raised(bench_conftest: ModuleType, error: Exception) -> None:
    bench = bench_conftest.Bench(_Config(), torch.device("cpu"), freeze_garbage=False)
    timer = bench_conftest._PlainBenchmark()

    def fail() -> None:
        raise error

    row = bench.run(timer, fail, suite="explain", method="fastgim", length=32768)
    assert row["status"] == "oom" and "allocate" in row["error"]
    assert bench.rows == [row] and timer.extra_info["status"] == "oom"


def test_other_errors_are_recorded_and_raised(bench_conftest: ModuleType) -> None:
    bench = bench_conftest.Bench(_Config(), torch.device("cpu"), freeze_garbage=False)

    def fail() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        bench.run(bench_conftest._PlainBenchmark(), fail, suite="attention", method="sdpa", length=8)
    assert bench.rows[0]["status"] == "error"


def test_bench_measures_time_and_memory(bench_conftest: ModuleType) -> None:
    bench = bench_conftest.Bench(_Config(), torch.device("cpu"), freeze_garbage=False)
    size = 64 * 2**20

    def allocate() -> None:
        buffer = torch.empty(size, dtype=torch.uint8)
        buffer.fill_(1)  # touch every page

    row = bench.run(bench_conftest._PlainBenchmark(), allocate, suite="attention", method="x", length=1)
    assert row["status"] == "ok" and row["rounds"] == 2 and row["time_s"] > 0
    if "memory_note" not in row:
        assert 0.9 * size <= row["peak_extra_bytes"] <= 1.5 * size, row


# --------------------------------------------------------------------------- the report


def _result(rows: list[dict], device_type: str = "cuda", scale: str = "gpu") -> dict:
    env = {"device": "NVIDIA H100", "device_type": device_type, "date": "2026-01-01T00:00:00+00:00",
           "torch_threads": 1, "versions": {"torch": "2.11"}}
    return {"format": "fastgim-bench/1", "suite": "explain", "scale": scale, "environment": env, "setup": {},
            "rows": rows, "path": Path("explain-gpu.json")}


def _row(method: str, length: int, seconds: float | None, gigabytes: float | None, status: str = "ok") -> dict:
    row = {"suite": "explain", "method": method, "length": length, "status": status}
    if status == "ok":
        row.update(time_s=seconds, peak_bytes=gigabytes * 1e9, peak_extra_bytes=gigabytes * 1e9 / 2)
    else:
        row["error"] = "OutOfMemoryError: CUDA out of memory"
    return row


@pytest.mark.parametrize(("ours", "naive", "long", "expected"), [
    ((1.2, 20.0), (7.0, 30.0), ("fastgim-checkpoint", 70.0), ["PASS", "PASS", "PASS", "PASS"]),
    ((1.4, 24.0), (4.0, 30.0), ("fastgim", 90.0), ["FAIL", "FAIL", "FAIL", "FAIL"]),
    ((1.0, 20.0), None, None, ["PASS", "PASS", "PASS", "FAIL"]),
])
def test_report_targets(report: ModuleType, ours, naive, long, expected) -> None:
    rows = [_row("grad-x-input", 4096, 1.0, 20.0), _row("fastgim", 4096, *ours)]
    rows.append(_row("naive-gim", 4096, *naive) if naive else _row("naive-gim", 4096, None, None, "oom"))
    rows.append(_row(long[0], 32768, 50.0, long[1]) if long else _row("fastgim", 32768, None, None, "oom"))
    verdicts = [verdict for _, _, verdict in report.targets(_result(rows))]
    assert verdicts == expected


def test_report_targets_not_measured_and_tables(report: ModuleType) -> None:
    rows = [_row("fastgim", 1024, 0.5, 3.0), _row("grad-x-input", 1024, 0.25, 2.0),
            _row("naive-gim", 1024, None, None, "oom")]
    result = _result(rows)
    assert [v for _, _, v in report.targets(result)] == ["not measured"] * 4
    text = report.markdown([result], {}, ["other.json"])
    assert "| naive-gim | OOM |" in text
    assert "| fastgim / grad-x-input | 1024 | 2.00x | 1.50x | 1.50x |" in text
    assert "`other.json`" in text
    cpu = report.markdown([_result(rows, "cpu", "cpu")], {}, [])
    assert "apply to the GPU run" in cpu and "| target |" not in cpu


# --------------------------------------------------------------------------- result files and options


def test_result_files_merge_split_runs(bench_conftest: ModuleType, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    first = [{"suite": "explain", "method": m, "length": n, "status": "ok", "time_s": 1.0}
             for m in ("fastgim", "grad-x-input") for n in (1024, 4096)]
    bench_conftest.write_results(first, tmp_path, cpu, "gpu", {"explain": {"model": "8B"}})
    again = [{"suite": "explain", "method": "fastgim", "length": 4096, "status": "oom"},
             {"suite": "explain", "method": "fastgim", "length": 32768, "status": "ok", "time_s": 9.0}]
    (path,) = bench_conftest.write_results(again, tmp_path, cpu, "gpu", {"explain": {"model": "8B"}})
    rows = json.loads(path.read_text())["rows"]
    assert [(r["method"], r["length"], r["status"]) for r in rows] == [
        ("fastgim", 1024, "ok"), ("grad-x-input", 1024, "ok"), ("fastgim", 4096, "oom"),
        ("grad-x-input", 4096, "ok"), ("fastgim", 32768, "ok")]
    bench_conftest.write_results(again, tmp_path, cpu, "gpu", merge=False)
    assert len(json.loads(path.read_text())["rows"]) == 2


def test_gpu_option_without_cuda_is_a_usage_error(bench_conftest: ModuleType) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --gpu is valid here")

    class Config(_Config):
        def getoption(self, name: str):
            return {"gpu": True}[name]

    with pytest.raises(pytest.UsageError, match="--gpu needs a CUDA device"):
        bench_conftest.pytest_configure(Config())
