"""``scripts/gpu_check.sh --dry-run``: every step of the one-shot GPU check on CPU (Triton interpreter, tiny
sizes), so the script cannot rot; and a failing or hanging step is recorded while the others still run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_dry_run_runs_every_step(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (json_path,) = tmp_path.glob("gpu-check-cpu-dry-run-*.json")
    (md_path,) = tmp_path.glob("gpu-check-cpu-dry-run-*.md")
    report = json.loads(json_path.read_text())
    assert report["dry_run"] and report["passed"] and report["environment"]["torch"] == torch.__version__
    steps = {record["step"]: record for record in report["steps"]}
    assert list(steps) == list(gpu_check.STEPS) and all(r["status"] == "ok" for r in steps.values())
    assert steps["tests"]["result"]["passed"] >= 1 and steps["tests"]["result"]["failed"] == 0
    rows = steps["attention"]["result"]["rows"]
    assert {r["method"] for r in rows} == {"gim_fused", "sdpa_gim", "sdpa_flash"}
    assert all(r["fwd_bwd_ms"] > 0 and r["vs_sdpa_flash"] > 0 for r in rows)
    explain = steps["explain"]["result"]
    assert explain["short"]["fastgim"]["time_s"] > 0 and explain["short"]["time_vs_grad_x_input"] > 0
    assert explain["long_checkpointed"]["length"] == 128 and explain["long_checkpointed"]["peak_bytes"] > 0
    assert steps["norms"]["result"]["records"]
    text = md_path.read_text()
    assert text.startswith("# fastgim GPU check (dry run on CPU): passed")
    assert all(f"## {step}" in text for step in gpu_check.STEPS)


def test_a_failing_step_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(dry, workdir):
        raise RuntimeError("Triton Error [CUDA]: no kernel image is available (simulated)")

    monkeypatch.setitem(gpu_check.STEP_FUNCTIONS, "norms", broken)
    args = gpu_check.parse_args(["--step", "norms", "--result", str(tmp_path / "norms.json"), "--dry-run"])
    assert gpu_check.run_step(args) == 1
    record = json.loads((tmp_path / "norms.json").read_text())
    assert record["status"] == "failed" and "no kernel image" in record["error"]
    assert "RuntimeError" in record["log_tail"]
    report = {"dry_run": True, "passed": False, "environment": {"torch": torch.__version__},
              "steps": [{**record, "step": "norms", "seconds": 1.0, "limit_s": 50}]}
    assert "| norms | failed |" in gpu_check.markdown(report)
    assert "FAILED" in gpu_check.markdown(report).splitlines()[0]


def test_a_hanging_step_is_stopped_at_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(gpu_check.DRY_LIMITS, "norms", 0.5)
    record = gpu_check.spawn_step("norms", dry=True)
    assert record["status"] == "failed" and record["error"] == "timed out after 0.5 s"
    assert record["seconds"] < 30


def test_counts_from_a_stopped_pytest_log() -> None:
    log = ("tests/test_a.py::test_x[bf16] PASSED [ 50%]\n[gw1] [ 60%] FAILED tests/test_a.py::test_y[fp16-gim]\n"
           "[gw0] [ 70%] SKIPPED tests/test_a.py::test_z\ntests/test_a.py::test_w ERROR  [ 80%]\n== 2 failed ==\n")
    counts = gpu_check._verbose_counts(log)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 2, 1)
    assert counts["failed_tests"] == ["tests/test_a.py::test_y[fp16-gim]", "tests/test_a.py::test_w"]


def test_markdown_of_partial_results() -> None:
    """A step stopped at its limit keeps what it measured; the summary shows it."""
    partial = {"parameters": 8.0e9, "dtype": "torch.bfloat16", "build_s": 4.0,
               "short": {"length": 4096, "fastgim": {"time_s": 1.5, "peak_gib": 21.0, "peak_extra_bytes": 2**31}}}
    report = {"dry_run": False, "passed": False, "environment": {"gpu": "NVIDIA H200"},
              "steps": [{"step": "explain", "status": "failed", "error": "timed out after 130 s (partial results)",
                         "seconds": 130.0, "limit_s": 130, "result": partial}]}
    text = gpu_check.markdown(report)
    assert "| fastgim | 4096 | 1.5 | 21 | 2 |" in text and "timed out after 130 s" in text
