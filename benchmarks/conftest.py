"""Shared machinery of the pytest-benchmark suites in ``benchmarks/test_bench_*.py``.

Run them all with ``bash scripts/bench.sh`` (CPU sizes) or ``bash scripts/bench.sh --gpu`` (large sizes
on one CUDA GPU), or directly::

    pytest benchmarks [--gpu] [--lengths 1024,4096] [--rounds 3] [--results-dir DIR] [--benchmark-disable]

Every case goes through :func:`run_case` (the ``bench`` fixture): one warm-up call that also measures
peak memory, then ``rounds`` timed calls through pytest-benchmark. A case that runs out of memory is a
result (``status: "oom"``), not a failure. At the end of the session every case of a suite is written to
``<results-dir>/<suite>-<cpu|gpu>.json`` with the device, the versions (torch, transformers, triton,
fastgim, gim-explain), the date and every figure; ``benchmarks/report.py`` turns those files into plots
and a markdown table.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (``peak_bytes``: everything allocated, weights
included; ``peak_extra_bytes``: above what was allocated before the call). On CPU the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc's mmap threshold pinned
low so freed tensors go back to the OS and every call's peak is its own; ``peak_extra_bytes`` is above
the resident size before the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
FORMAT = "fastgim-bench/1"
_ROWS = pytest.StashKey[list]()
SUITE_SETUP = pytest.StashKey[dict]()


# --------------------------------------------------------------------------- options and sizes


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastgim benchmarks")
    group.addoption("--gpu", action="store_true", default=False,
                    help="large sizes on a CUDA GPU (the Llama-3.1-8B-shaped model at N = 1k..32k)")
    group.addoption("--lengths", default=None,
                    help="comma-separated sequence lengths replacing each suite's defaults, e.g. 1024,4096")
    group.addoption("--rounds", type=int, default=None,
                    help="timed calls per case after the warm-up call (default 3 on CPU, 3 on GPU)")
    group.addoption("--results-dir", type=Path, default=RESULTS_DIR,
                    help="folder for the <suite>-<cpu|gpu>.json result files (default benchmarks/results)")
    group.addoption("--fresh-results", action="store_true", default=False,
                    help="replace the result files instead of keeping the rows this run does not re-measure")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("gpu") and not torch.cuda.is_available():
        raise pytest.UsageError("--gpu needs a CUDA device, and torch.cuda.is_available() is False here; "
                                "drop --gpu to run the CPU sizes")
    config.stash[_ROWS] = []
    _pin_malloc_mmap_threshold()


def scale(config: pytest.Config) -> str:
    """``"gpu"`` with ``--gpu``, else ``"cpu"``: the key of each suite's size tables."""
    return "gpu" if config.getoption("gpu") else "cpu"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrises ``length`` from the module's ``LENGTHS[scale]`` (or ``--lengths``)."""
    if "length" not in metafunc.fixturenames:
        return
    option = metafunc.config.getoption("lengths")
    if option:
        try:
            lengths = [int(part) for part in option.split(",") if part.strip()]
        except ValueError:
            raise pytest.UsageError(f"--lengths must be comma-separated integers, got {option!r}") from None
    else:
        lengths = list(metafunc.module.LENGTHS[scale(metafunc.config)])
    metafunc.parametrize("length", lengths, ids=[f"N{n}" for n in lengths])


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device the suites run on: CUDA with ``--gpu``, else the CPU."""
    return torch.device("cuda") if pytestconfig.getoption("gpu") else torch.device("cpu")


# --------------------------------------------------------------------------- environment


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions and date for the result files."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {
        "device": name,
        "device_type": device.type,
        "device_memory_bytes": memory,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "triton": _version("triton"),
            "fastgim": _version("fastgim"),
            "gim-explain": _version("gim-explain"),
            "pytest-benchmark": _version("pytest-benchmark"),
        },
    }


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Adds the device and the versions to pytest-benchmark's own JSON (``--benchmark-json``)."""
    machine_info["fastgim"] = environment(torch.device("cuda") if config.getoption("gpu") else torch.device("cpu"))


# --------------------------------------------------------------------------- peak memory


_M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _pin_malloc_mmap_threshold() -> None:
    """Serve allocations >= 64 KiB by mmap, so that freed tensors leave the resident set at once."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak_resident() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Context manager measuring the peak memory of its block on ``device`` (see the module docstring)."""

    device: torch.device
    peak_bytes: int | None = None
    peak_extra_bytes: int | None = None
    note: str = ""
    _base: int = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        if not _reset_peak_resident():
            self.note = "peak memory unavailable: /proc/self/clear_refs is not writable here"
        self._base = _resident_bytes()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif not self.note:
            self.peak_bytes = _peak_resident_bytes()
        if self.peak_bytes is not None:
            self.peak_extra_bytes = max(self.peak_bytes - self._base, 0)


# --------------------------------------------------------------------------- running one case


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA OOM and for the CPU allocator's failure to allocate."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _free(device: torch.device, freeze: bool) -> None:
    """Collect garbage (cycles left by a failed call included); with ``freeze``, freeze the survivors so
    that the next collection scans only new objects (a full one in a transformers process takes ~0.5 s)."""
    gc.collect()
    if freeze:
        gc.freeze()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Bench:
    """Runs benchmark cases and keeps their rows for the session's result files."""

    config: pytest.Config
    device: torch.device
    rows: list[dict] = field(default_factory=list)
    freeze_garbage: bool = True  # gc.freeze() between cases; pytest_unconfigure unfreezes

    @property
    def rounds(self) -> int:
        """Timed calls per case (``--rounds``, default 3)."""
        return self.config.getoption("rounds") or 3

    @property
    def scale(self) -> str:
        """``"gpu"`` or ``"cpu"``: the key of each suite's size tables."""
        return scale(self.config)

    def describe(self, suite: str, setup: dict[str, Any]) -> None:
        """Record a suite's fixed setup (model, shapes, dtype) for its result file."""
        self.config.stash.setdefault(SUITE_SETUP, {})[suite] = setup

    def run(self, benchmark: Any, call: Callable[[], object], *, suite: str, method: str, length: int,
            info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Measure ``call``: peak memory of a warm-up call, then ``rounds`` timed calls.

        Returns the row (also stored for ``<suite>-<scale>.json`` and put in ``benchmark.extra_info``).
        An out-of-memory error gives ``status: "oom"``; any other error is recorded and re-raised.
        """
        row: dict[str, Any] = {"suite": suite, "method": method, "length": length, **(info or {}),
                               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.rows.append(row)
        synchronize = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)

        def timed() -> None:
            call()
            synchronize()

        _free(self.device, self.freeze_garbage)
        try:
            self._measure(benchmark, timed, row)
        except Exception as error:  # noqa: BLE001 - an OOM is a result; anything else is re-raised below
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}"
            row["status"] = "oom" if is_out_of_memory(error) else "error"
            if row["status"] == "error":
                raise
        finally:
            benchmark.extra_info.update(row)
        if row["status"] == "oom":
            _free(self.device, self.freeze_garbage)  # the failed call's frames may hold the memory in cycles
        return row

    def _measure(self, benchmark: Any, timed: Callable[[], None], row: dict[str, Any]) -> None:
        disabled = getattr(benchmark, "disabled", False)

        def first_call() -> None:
            start = time.perf_counter()
            timed()
            row["first_call_s"] = time.perf_counter() - start

        with PeakMemory(self.device) as memory:
            if disabled:  # --benchmark-disable: pedantic makes just this one call
                benchmark.pedantic(first_call, rounds=1, iterations=1)
            else:
                first_call()
        row.update(peak_bytes=memory.peak_bytes, peak_extra_bytes=memory.peak_extra_bytes)
        if memory.note:
            row["memory_note"] = memory.note
        if disabled:
            row.update(status="ok", timing="single call", time_s=row["first_call_s"], rounds=1)
            return
        benchmark.pedantic(timed, rounds=self.rounds, iterations=1, warmup_rounds=0)
        stats = benchmark.stats.stats
        timing = "perf_counter (no pytest-benchmark)" if isinstance(benchmark, _PlainBenchmark) else "pytest-benchmark"
        row.update(status="ok", timing=timing, time_s=stats.median, time_mean_s=stats.mean,
                   time_min_s=stats.min, time_stddev_s=stats.stddev, rounds=stats.rounds)


class _Stats:
    """The few statistics of pytest-benchmark's ``benchmark.stats.stats`` that :class:`Bench` reads."""

    def __init__(self, times: list[float]) -> None:
        ordered = sorted(times)
        middle = len(ordered) // 2
        self.rounds, self.min, self.max = len(times), ordered[0], ordered[-1]
        self.median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        self.mean = sum(times) / len(times)
        self.stddev = (sum((t - self.mean) ** 2 for t in times) / (len(times) - 1)) ** 0.5 if len(times) > 1 else 0.0


class _PlainBenchmark:
    """Stand-in for pytest-benchmark's fixture where the plugin is not installed (e.g. an offline GPU box)."""

    disabled = False

    def __init__(self) -> None:
        self.extra_info: dict[str, Any] = {}
        self.group: str | None = None
        self.stats: Any = None

    def pedantic(self, target: Callable[[], object], rounds: int = 1, iterations: int = 1,
                 warmup_rounds: int = 0) -> None:
        for _ in range(warmup_rounds):
            target()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(iterations):
                target()
            times.append((time.perf_counter() - start) / iterations)
        self.stats = type("Metadata", (), {"stats": _Stats(times)})()


@pytest.fixture
def timer(request: pytest.FixtureRequest) -> Any:
    """pytest-benchmark's ``benchmark`` fixture, or a minimal stand-in where the plugin is absent / disabled."""
    if request.config.pluginmanager.hasplugin("benchmark"):
        return request.getfixturevalue("benchmark")
    return _PlainBenchmark()


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config, device: torch.device) -> Bench:
    """The session's :class:`Bench`: ``bench.run(benchmark, call, suite=..., method=..., length=...)``."""
    return Bench(pytestconfig, device, pytestconfig.stash[_ROWS])


# --------------------------------------------------------------------------- result files


def _kept_rows(path: Path, env: dict[str, Any], rows: list[dict]) -> list[dict]:
    """Rows of an earlier file at ``path`` (same format, device and versions) that ``rows`` does not re-measure."""
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    same = (old.get("format") == FORMAT and old.get("environment", {}).get("device") == env["device"]
            and old.get("environment", {}).get("versions") == env["versions"])
    if not same:
        return []
    measured = {(row["method"], row["length"]) for row in rows}
    return [row for row in old.get("rows", []) if (row.get("method"), row.get("length")) not in measured]


def write_results(rows: list[dict], directory: Path, device: torch.device, scale_name: str,
                  suites_info: dict[str, dict] | None = None, merge: bool = True) -> list[Path]:
    """Write one ``<suite>-<scale>.json`` per suite present in ``rows``; returns the paths.

    With ``merge``, rows of an existing file from the same device and versions that this session did not
    re-measure are kept (each row carries its own ``date``), so a long GPU run can be split into several
    sessions (``-k``, ``--lengths``) without losing the earlier ones.
    """
    written = []
    env = environment(device)
    for suite in sorted({row["suite"] for row in rows}):
        path = directory / f"{suite}-{scale_name}.json"
        mine = [row for row in rows if row["suite"] == suite]
        kept = _kept_rows(path, env, mine) if merge else []
        order = {method: i for i, method in enumerate(dict.fromkeys(r["method"] for r in kept + mine))}
        merged = sorted(kept + mine, key=lambda r: (int(r["length"]), order[r["method"]]))
        payload = {"format": FORMAT, "suite": suite, "scale": scale_name, "environment": env,
                   "setup": (suites_info or {}).get(suite, {}), "rows": merged}
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        written.append(path)
    return written


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    device = torch.device("cuda") if config.getoption("gpu") else torch.device("cpu")
    paths = write_results(rows, config.getoption("results_dir"), device, scale(config),
                          config.stash.get(SUITE_SETUP, {}), merge=not config.getoption("fresh_results"))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for path in paths:
            reporter.write_line(f"fastgim benchmark results: {path}")
        for row in rows:
            if row.get("status") == "oom":
                reporter.write_line(f"out of memory (recorded): {row['suite']} {row['method']} N={row['length']}")


def pytest_unconfigure(config: pytest.Config) -> None:
    gc.unfreeze()  # let interpreter shutdown free what the benchmarks froze
    gc.collect()
