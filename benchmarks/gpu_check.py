"""One-shot GPU check: GPU tests, the attention benchmark, explain on the Llama-3.1-8B shape and the norm
kernels' bandwidth, written to one JSON and one Markdown summary naming the GPU and the versions.

    bash scripts/gpu_check.sh              CUDA machine: under 8 minutes, Triton compiles included
    bash scripts/gpu_check.sh --dry-run    CPU: Triton interpreter, tiny sizes, every step (run in CI)

Steps, in order (``--steps`` picks some):

1. ``tests``: ``pytest -m gpu`` on a selection: sdpa vs the float64 reference for every feature and
   fp16 / bf16 / fp32, Triton vs sdpa, Triton with softcap vs the reference.
2. ``attention``: B=2, Hq=32, Hkv=8, D=128, bf16, causal, N=4k and 16k: gim_fused (Triton GIM),
   fused_plain, sdpa_gim (GIM from PyTorch's kernels), SDPA-flash plain and FlexAttention plain;
   TFLOP/s and each method's fwd+bwd time against SDPA-flash plain.
3. ``explain``: the Llama-3.1-8B shape (random weights, bf16): ``fastgim.explain`` vs plain
   gradient x input on SDPA at N=4096 (time, peak memory), then N=32768 with checkpointing.
4. ``norms``: RMSNorm / LayerNorm / gated activation kernels, GB/s against the copy bandwidth.

On a GPU every step runs in its own Python process under a time limit, so a failure, a CUDA error
or a hang in one step is recorded (with the end of its log) and the next step still runs; a dry run
runs them in one process (its steps are tiny and imports would dominate). Results:
``benchmarks/results/gpu-check-<device>-<time>.json`` and ``.md`` (``--out`` picks the folder).
Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FORMAT = "fastgim-gpu-check/1"
STEPS = ("tests", "attention", "explain", "norms")
#: Seconds each step may take on the GPU (7.5 minutes together) and in a dry run.
LIMITS = {"tests": 150, "attention": 120, "explain": 130, "norms": 50}
DRY_LIMITS = {"tests": 240, "attention": 240, "explain": 240, "norms": 120}
#: The GPU test selection: every sdpa feature test (no compiles), Triton vs sdpa with GIM on for the
#: mask / window / gate / GQA / cache kernels, the benchmark shape, and Triton's softcap vs reference.
GPU_TESTS = ["tests/test_attention_sdpa_gpu.py", "tests/test_attention_triton.py"]
GPU_SELECTION = ("test_gpu_sdpa_backend_features or test_gpu_triton_agrees_with_sdpa_on_the_benchmark_shape "
                 "or (test_gpu_triton_agrees_with_sdpa and gim and (causal or pad or float4d or gate or dim80)) "
                 "or (test_gpu_features and softcap and gim)")
DRY_TESTS = ["tests/test_attention_sdpa_gpu.py"]
DRY_SELECTION = "test_triton_agrees_with_sdpa_smoke and gate"
ATTENTION_METHODS = ["gim_fused", "fused_plain", "sdpa_gim", "sdpa_flash", "flex"]
FASTGIM_METHODS = ("gim_fused", "fused_plain", "sdpa_gim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown summary")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # internal: where that step writes
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- helpers


def _load(name: str) -> ModuleType:
    """A module of ``benchmarks/`` by file name (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"fastgim_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _device():
    import torch

    if os.environ.get("FASTGIM_GPU_CHECK_DRY") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False); use --dry-run on CPU")
    return torch.device("cuda")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """GPU, driver and library versions (imports torch; CUDA is queried only if present)."""
    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "triton": _version("triton"), "transformers": _version("transformers"), "fastgim": _version("fastgim"),
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                   multiprocessors=props.multi_processor_count, gpu_count=torch.cuda.device_count(),
                   driver=_driver_version())
    else:
        env["gpu"] = None
    return env


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- step 1: tests


def step_tests(dry: bool, workdir: Path) -> dict[str, Any]:
    """``pytest`` on the selection; counts and the failing test ids (JUnit XML, or its verbose log if it
    has to be stopped before the step's own limit)."""
    report = workdir / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rN", f"--junitxml={report}",
               "-o", "addopts="]
    if dry:
        command += [*DRY_TESTS, "-m", "interpreter", "-k", DRY_SELECTION]
    else:
        command += [*GPU_TESTS, "-m", "gpu", "-k", GPU_SELECTION, "--durations=15"]
        if importlib.util.find_spec("xdist") is not None:
            command += ["-n", "12"]  # Triton compiles in parallel processes
    limit = (DRY_LIMITS if dry else LIMITS)["tests"] - 15
    returncode, output = _run_killable(command, limit)
    counts = _junit_counts(report) if report.exists() else _verbose_counts(output)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    result = {"command": shlex.join(["python", *command[1:]]), "returncode": returncode, "summary": summary,
              **counts}
    if returncode != 0 or not counts.get("passed"):
        stopped = f"stopped after {limit} s; " if returncode is None else ""
        raise StepFailure(f"pytest {stopped}exit code {returncode}: {summary}", result, output[-4000:])
    return result


def _run_killable(command: list[str], limit: float) -> tuple[int | None, str]:
    """Runs ``command`` (and whatever it starts) for at most ``limit`` s: (exit code or None, output)."""
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=limit)
        return child.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        return None, output


def _verbose_counts(output: str) -> dict[str, Any]:
    """Counts from ``pytest -v`` lines, for a run stopped before it wrote its JUnit XML."""
    counts, failed = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}, []
    for line in output.splitlines():
        outcome, name = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED)\b", line), re.search(r"tests/\S+::\S+", line)
        if outcome and name:
            counts[outcome.group(1)] += 1
            if outcome.group(1) in ("FAILED", "ERROR"):
                failed.append(name.group())
    return {"collected": None, "passed": counts["PASSED"], "failed": len(failed), "skipped": counts["SKIPPED"],
            "failed_tests": failed[:50]}


def _junit_counts(path: Path) -> dict[str, Any]:
    root = ElementTree.parse(path).getroot()
    cases = root.iter("testcase")
    failed, skipped, total = [], 0, 0
    for case in cases:
        total += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped += 1
    return {"collected": total, "passed": total - len(failed) - skipped, "failed": len(failed),
            "skipped": skipped, "failed_tests": failed[:50]}


# --------------------------------------------------------------------------- step 2: attention


def step_attention(dry: bool, workdir: Path) -> dict[str, Any]:
    import torch

    bench = _load("attention")
    if dry:
        argv = ["--smoke", "--methods", "gim_fused", "sdpa_gim", "sdpa_flash", "--repeats", "1"]
    else:
        argv = ["--batch", "2", "--q-heads", "32", "--kv-heads", "8", "--dims", "128", "--dtype", "bf16",
                "--lengths", "4096", "16384", "--methods", *ATTENTION_METHODS]
    args = bench.parse_args([*argv, "--out", str(workdir)])
    device = _device()
    shape = {k: getattr(args, k) for k in ("batch", "q_heads", "kv_heads", "dims", "dtype", "lengths")}
    result: dict[str, Any] = {"shape": {**shape, "causal": not args.bidirectional}, "rows": []}
    rows = result["rows"]
    for method in args.methods:  # FlexAttention (a torch.compile) last: if time runs out, it is what is lost
        for length in args.lengths:
            rows.append(bench.measure(method, args, length, args.dims[0], device))
            _ratios_to_flash(rows)
            report_progress(result)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["targets"] = _attention_targets(rows)
    broken = [f"{r['method']} N={r['length']}: {r['error']}" for r in rows
              if "error" in r and r["method"] in FASTGIM_METHODS]
    result["other_errors"] = [f"{r['method']} N={r['length']}: {r['error']}" for r in rows
                              if "error" in r and r["method"] not in FASTGIM_METHODS]
    if broken:
        raise StepFailure("; ".join(broken), result)
    return result


def _ratios_to_flash(rows: list[dict]) -> None:
    """``vs_sdpa_flash``: fwd+bwd time over SDPA-flash plain's at the same length (throughput is 1 / it)."""
    flash = {r["length"]: r["fwd_bwd_ms"] for r in rows if r["method"] == "sdpa_flash" and "fwd_bwd_ms" in r}
    for row in rows:
        if "fwd_bwd_ms" in row and row["length"] in flash:
            row["vs_sdpa_flash"] = row["fwd_bwd_ms"] / flash[row["length"]]
            row["throughput_vs_sdpa_flash"] = 1.0 / row["vs_sdpa_flash"]


def _attention_targets(rows: list[dict]) -> list[dict]:
    targets = []
    for row in rows:
        if "vs_sdpa_flash" not in row:
            continue
        if row["method"] == "gim_fused":
            targets.append({"target": f"gim_fused throughput >= 0.8x SDPA-flash plain (N={row['length']})",
                            "value": row["throughput_vs_sdpa_flash"], "met": row["throughput_vs_sdpa_flash"] >= 0.8})
        if row["method"] == "sdpa_gim":
            targets.append({"target": f"sdpa_gim time <= 2.2x SDPA-flash plain (N={row['length']})",
                            "value": row["vs_sdpa_flash"], "met": row["vs_sdpa_flash"] <= 2.2})
    return targets


# --------------------------------------------------------------------------- step 3: explain


def step_explain(dry: bool, workdir: Path) -> dict[str, Any]:
    import torch

    explain_suite, harness = _load("test_bench_explain"), _load("conftest")
    device = _device()
    scale = "cpu" if dry else "gpu"
    start = time.perf_counter()
    model = explain_suite.build_model(scale, device)
    result: dict[str, Any] = {"model": explain_suite.MODELS[scale][0], "dtype": str(model.dtype),
                              "build_s": time.perf_counter() - start,
                              "parameters": sum(p.numel() for p in model.parameters())}
    short, long = (64, 128) if dry else (4096, 32768)
    methods = {"fastgim": explain_suite.explain_fastgim, "grad-x-input": explain_suite.explain_grad_x_input}
    runs = result["short"] = {"length": short}
    for name, explainer in methods.items():
        runs[name] = _explain_run(explainer, model, short, device, harness, rounds=1 if dry else 3)
        report_progress(result)
    base, ours = runs["grad-x-input"], runs["fastgim"]
    result["short"]["time_vs_grad_x_input"] = ours["time_s"] / base["time_s"]
    result["short"]["peak_vs_grad_x_input"] = ours["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None
    result["short"]["peak_extra_vs_grad_x_input"] = (ours["peak_extra_bytes"] / base["peak_extra_bytes"]
                                                     if base["peak_extra_bytes"] else None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    checkpointed = lambda m, ids: explain_suite.explain_fastgim(m, ids, checkpoint=True)  # noqa: E731
    result["long_checkpointed"] = {"length": long, **_explain_run(checkpointed, model, long, device, harness, 0)}
    result["targets"] = [
        {"target": f"explain time <= 1.3x gradient x input (N={short})",
         "value": result["short"]["time_vs_grad_x_input"], "met": result["short"]["time_vs_grad_x_input"] <= 1.3},
        {"target": f"explain peak memory <= 1.15x gradient x input (N={short}, weights included)",
         "value": result["short"]["peak_vs_grad_x_input"],
         "met": (result["short"]["peak_vs_grad_x_input"] or 0) <= 1.15},
    ]
    return result


def _explain_run(explainer, model, length: int, device, harness: ModuleType, rounds: int) -> dict[str, Any]:
    """One call under :class:`PeakMemory` (also the warm-up), then ``rounds`` timed calls (median)."""
    import torch

    ids = torch.randint(1, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    ids = ids.to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    with harness.PeakMemory(device) as memory:
        attribution = explainer(model, ids)
        sync()
    first = time.perf_counter() - start
    if tuple(attribution.shape) != (length,) or not bool(torch.isfinite(attribution).all()):
        raise RuntimeError(f"bad attribution: shape {tuple(attribution.shape)}, finite "
                           f"{bool(torch.isfinite(attribution).all())}")
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        explainer(model, ids)
        sync()
        times.append(time.perf_counter() - start)
    return {"first_call_s": first, "time_s": statistics.median(times) if times else first, "rounds": rounds,
            "peak_bytes": memory.peak_bytes, "peak_extra_bytes": memory.peak_extra_bytes,
            "peak_gib": memory.peak_bytes / 2**30 if memory.peak_bytes else None}


# --------------------------------------------------------------------------- step 4: norms


def step_norms(dry: bool, workdir: Path) -> dict[str, Any]:
    norms = _load("norms")
    argv = ["--smoke"] if dry else ["--rows", "4096", "65536", "--hidden", "4096", "8192", "--repeats", "20"]
    if norms.main([*argv, "--out", str(workdir)]) != 0:
        raise RuntimeError("benchmarks/norms.py returned a non-zero status")
    (written,) = workdir.glob("norms_*.json")
    data = json.loads(written.read_text())
    return {"settings": argv, "meta": data["meta"], "records": data["results"]}


# --------------------------------------------------------------------------- running the steps


def report_progress(result: dict[str, Any]) -> None:
    """Saves a step's partial result where the parent reads it if the step is stopped at its limit."""
    path = os.environ.get("FASTGIM_GPU_CHECK_PROGRESS")
    if path:
        Path(path).write_text(json.dumps(result, default=str))


class StepFailure(Exception):
    """A step that ran but did not pass: its partial result and log still go in the report."""

    def __init__(self, message: str, result: dict[str, Any], log: str = "") -> None:
        super().__init__(message)
        self.result, self.log = result, log


STEP_FUNCTIONS = {"tests": step_tests, "attention": step_attention, "explain": step_explain, "norms": step_norms}


def execute_step(step: str, dry: bool) -> dict[str, Any]:
    """Runs one step here: ``{"status": "ok", "result"}`` or ``{"status": "failed", "error", "log_tail"}``."""
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{step}-") as workdir:
        try:
            return {"status": "ok", "result": STEP_FUNCTIONS[step](dry, Path(workdir))}
        except StepFailure as failure:
            return {"status": "failed", "error": str(failure), "result": failure.result, "log_tail": failure.log}
        except Exception as error:  # noqa: BLE001 - recorded, the next step runs
            import traceback

            return {"status": "failed", "error": f"{type(error).__name__}: {error}",
                    "log_tail": traceback.format_exc()[-4000:]}


def run_step(args: argparse.Namespace) -> int:
    """Child process: run one step, write its record to ``--result``."""
    record = execute_step(args.step, args.dry_run)
    args.result.write_text(json.dumps(record, indent=1, default=str))
    return 0 if record["status"] == "ok" else 1


def _step_environment(dry: bool) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if dry:
        env.update(TRITON_INTERPRET="1", FASTGIM_GPU_CHECK_DRY="1", CUDA_VISIBLE_DEVICES="")
    return env


def spawn_step(step: str, dry: bool) -> dict[str, Any]:
    """Runs one step in a child process under its time limit; the step's record plus timing."""
    limit = (DRY_LIMITS if dry else LIMITS)[step]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        path = Path(folder) / f"{step}.json"
        progress = Path(folder) / f"{step}.partial.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--result", str(path)]
        env = dict(_step_environment(dry), FASTGIM_GPU_CHECK_PROGRESS=str(progress))
        child = subprocess.Popen([*command, *(["--dry-run"] if dry else [])], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = child.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the step and everything it started (pytest workers)
            output, _ = child.communicate()
            record = {"status": "failed", "error": f"timed out after {limit} s", "log_tail": output[-4000:]}
            if progress.exists():
                record.update(result=json.loads(progress.read_text()), error=record["error"] + " (partial results)")
        else:
            if path.exists():
                record = json.loads(path.read_text())
            else:
                record = {"status": "failed", "error": f"the step's process died (exit code {child.returncode})",
                          "log_tail": output[-4000:]}
    record.update(step=step, seconds=round(time.perf_counter() - start, 1), limit_s=limit)
    return record


def in_process_step(step: str) -> dict[str, Any]:
    """A dry-run step in this process (imports dominate the tiny steps' cost; no time limit)."""
    start = time.perf_counter()
    record = execute_step(step, dry=True)
    record.update(step=step, seconds=round(time.perf_counter() - start, 1), limit_s=DRY_LIMITS[step])
    return record


def orchestrate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.dry_run:  # before torch and the kernels are imported here; the pytest step inherits it
        os.environ.update(_step_environment(dry=True))
    env = environment()
    if not args.dry_run and env["gpu"] is None:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run with --dry-run on CPU",
              file=sys.stderr)
        return 2
    records = []
    for step in args.steps:
        print(f"gpu_check: {step} ...", flush=True)
        records.append(in_process_step(step) if args.dry_run else spawn_step(step, dry=False))
        print(f"gpu_check: {step} {records[-1]['status']} in {records[-1]['seconds']} s"
              + (f": {records[-1]['error']}" if records[-1]["status"] != "ok" else ""), flush=True)
    report = {"format": FORMAT, "dry_run": args.dry_run, "environment": env, "steps": records,
              "total_s": round(time.perf_counter() - start, 1),
              "passed": all(r["status"] == "ok" for r in records)}
    json_path, md_path = write_report(report, args.out)
    print(f"gpu_check: wrote {json_path} and {md_path}")
    return 0 if report["passed"] else 1


def write_report(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    device = report["environment"].get("gpu") or "cpu-dry-run"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = folder / f"gpu-check-{slug}-{stamp}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# --------------------------------------------------------------------------- Markdown


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# fastgim GPU check{' (dry run on CPU)' if report['dry_run'] else ''}: "
             f"{'passed' if report['passed'] else 'FAILED'}", ""]
    names = ("gpu", "capability", "gpu_memory_gib", "driver", "torch", "cuda", "cudnn", "triton", "transformers",
             "python", "fastgim", "git_commit", "date")
    lines += ["| | |", "|---|---|", *[f"| {n} | {_fmt(env.get(n))} |" for n in names], ""]
    lines += ["| step | status | seconds | note |", "|---|---|---|---|"]
    for record in report["steps"]:
        lines.append(f"| {record['step']} | {record['status']} | {record['seconds']} / {record['limit_s']} | "
                     f"{record.get('error', '')[:200]} |")
    for record in report["steps"]:
        result = record.get("result")
        if result:
            lines += ["", f"## {record['step']}", "", *SECTIONS[record["step"]](result)]
    return "\n".join(lines) + "\n"


def _md_tests(result: dict) -> list[str]:
    lines = [f"`{result['command']}`", "",
             f"{result.get('passed', 0)} passed, {result.get('failed', 0)} failed, {result.get('skipped', 0)} "
             f"skipped of {_fmt(result.get('collected'))}"]
    return lines + [f"- FAILED {name}" for name in result.get("failed_tests", [])]


def _md_attention(result: dict) -> list[str]:
    columns = ("method", "length", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_bwd_tflops", "vs_sdpa_flash",
               "peak_mem_mib")
    lines = [f"shape: {result['shape']}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        cells = [_fmt(row.get(c)) for c in columns] if "error" not in row else [row["method"], str(row["length"]),
                                                                                 f"error: {row['error']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""] + _md_targets(result.get("targets", []))


def _md_explain(result: dict) -> list[str]:
    lines = [f"model: {result['parameters'] / 1e9:.2f}B parameters, {result['dtype']}, built in "
             f"{result['build_s']:.1f} s", "", "| method | N | time s | peak GiB | peak above start GiB |",
             "|---|---|---|---|---|"]
    short = result.get("short", {})
    runs = [(name, short["length"], short[name]) for name in ("grad-x-input", "fastgim") if name in short]
    if "long_checkpointed" in result:
        runs.append(("fastgim + checkpointing", result["long_checkpointed"]["length"], result["long_checkpointed"]))
    for name, length, run in runs:
        extra = run["peak_extra_bytes"] / 2**30 if run.get("peak_extra_bytes") is not None else None
        lines.append(f"| {name} | {length} | {_fmt(run['time_s'])} | {_fmt(run['peak_gib'])} | {_fmt(extra)} |")
    return lines + [""] + _md_targets(result.get("targets", []))


def _md_norms(result: dict) -> list[str]:
    lines = ["| op | backend | rows | hidden | us | GB/s | % of copy |", "|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        lines.append(f"| {r['op']} | {r['backend']} | {r['rows']} | {r['hidden']} | {_fmt(r['us'])} | "
                     f"{_fmt(r['gbps'])} | {_fmt(r['pct_of_copy'])} |")
    return lines


def _md_targets(targets: list[dict]) -> list[str]:
    return [f"- {'met' if t['met'] else 'MISSED'}: {t['target']} (measured {_fmt(t['value'])})" for t in targets]


SECTIONS = {"tests": _md_tests, "attention": _md_attention, "explain": _md_explain, "norms": _md_norms}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step is not None:
        return run_step(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
