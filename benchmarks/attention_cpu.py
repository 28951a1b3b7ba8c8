"""CPU attention: forward + backward of ``fastgim.attention`` with GIM's backward vs plain PyTorch SDPA.

Problem: B=1, Hq=12, Hkv=4 (GQA), D=64, causal, N = 512, 2048, 4096, 8192, float32 and bfloat16.
Methods, on the same inputs:

* ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` then
  ``.backward(dout)`` (PyTorch's fused CPU flash attention, ordinary gradient);
* ``gim``: ``fastgim.attention(..., backend="torch", gim=GIMSettings())`` then ``.backward(dout)``
  (T = 2 and the Q/K/V scales); its backward runs on the C++ CPU kernel when that loads, else on the
  PyTorch path: the ``backward_path`` field records which.

Method of the suite: both methods alternated in one process (sdpa, gim, sdpa, gim, ...) after a
warm-up call of each, so that a slow phase of a shared machine hits both alike; the ratio is the
median over the pairs of gim's time / sdpa's time in the same pair, for wall-clock time and for
process CPU time. The load average (``os.getloadavg``) is recorded before and after each row: only
numbers from an idle machine (load well under the core count) measure the code.

    python benchmarks/attention_cpu.py                 # all sizes, both dtypes, 5 pairs (~3-4 min idle)
    python benchmarks/attention_cpu.py --pairs 9 --lengths 2048 --dtypes float32
    python benchmarks/attention_cpu.py --quick         # 5 pairs, 3 at N=8192 ... see --help

Writes ``benchmarks/results/attention_cpu.json`` (``--output``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fastgim
from fastgim.ops import attention_cpu
from fastgim.settings import GIMSettings

RESULTS = Path(__file__).resolve().parent / "results" / "attention_cpu.json"
LENGTHS = (512, 2048, 4096, 8192)
DTYPES = ("float32", "bfloat16")
HEADS, KV_HEADS, DIM = 12, 4, 64
#: The issue's target: gim fwd+bwd at most this many times sdpa's.
TARGET_RATIO = 1.2


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and its logical core count."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} logical cores)"


def _clock(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def alternated(methods: dict[str, Callable[[], None]], pairs: int) -> dict[str, dict[str, list[float]]]:
    """Each method once to warm up, then ``pairs`` rounds calling every method in turn."""
    for fn in methods.values():
        fn()
    times = {name: {"wall": [], "cpu": []} for name in methods}
    for _ in range(pairs):
        for name, fn in methods.items():
            wall, cpu = _clock(fn)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def measure(length: int, dtype_name: str, pairs: int) -> dict:
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(length)
    shape = lambda heads: (1, heads, length, DIM)  # noqa: E731
    q, k, v = (torch.randn(shape(h), generator=generator).to(dtype).requires_grad_()
               for h in (HEADS, KV_HEADS, KV_HEADS))
    dout = torch.randn(shape(HEADS), generator=generator).to(dtype)
    settings = GIMSettings()

    def sdpa() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(dout)

    def gim() -> None:
        fastgim.attention(q, k, v, causal=True, gim=settings, backend="torch").backward(dout)

    load_before = os.getloadavg()
    times = alternated({"sdpa": sdpa, "gim": gim}, pairs)
    row: dict = {"length": length, "dtype": dtype_name, "pairs": pairs,
                 "load_average_before": load_before, "load_average_after": os.getloadavg()}
    for clock in ("wall", "cpu"):
        ratios = [g / s for g, s in zip(times["gim"][clock], times["sdpa"][clock])]
        row[f"ratio_{clock}"] = statistics.median(ratios)
        row[f"pair_ratios_{clock}"] = ratios
        for name in ("sdpa", "gim"):
            row[f"{name}_{clock}_s"] = statistics.median(times[name][clock])
    row["times"] = times
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'N':>5} {'dtype':>8} | {'SDPA s':>8} {'GIM s':>8} | {'GIM/SDPA wall':>13} {'(cpu)':>7} | "
          f"{'load 1m before/after':>20}  pair ratios (wall)")
    for row in rows:
        pairs = " ".join(f"{r:.2f}" for r in row["pair_ratios_wall"])
        print(f"{row['length']:>5} {row['dtype']:>8} | {row['sdpa_wall_s']:>8.3f} {row['gim_wall_s']:>8.3f} | "
              f"{row['ratio_wall']:>12.2f}x {row['ratio_cpu']:>6.2f}x | "
              f"{row['load_average_before'][0]:>9.2f} / {row['load_average_after'][0]:<8.2f}  {pairs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--pairs", type=int, default=5, help="alternated pairs per row (default 5)")
    parser.add_argument("--pairs-8192", type=int, default=None,
                        help="pairs at N >= 8192 (default: --pairs; the suite's minimum is 5)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--quick", action="store_true",
                        help="float32 at every N plus bfloat16 at 2048, 5 pairs: ~1.5 min on an idle 2-core machine")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backward_path = attention_cpu.kernel_status()  # builds / loads the kernel before any timing
    plan = [(n, d) for d in args.dtypes for n in args.lengths]
    if args.quick:
        plan = [(n, "float32") for n in args.lengths] + [(2048, "bfloat16")]
    rows = []
    for length, dtype_name in plan:
        pairs = args.pairs_8192 if (args.pairs_8192 and length >= 8192) else args.pairs
        rows.append(measure(length, dtype_name, pairs))
        print_table(rows[-1:])
    print()
    print_table(rows)
    print(f"backward path: {backward_path}; target: GIM/SDPA <= {TARGET_RATIO}x")
    report = {
        "benchmark": "attention_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastgim": fastgim.__version__,
        "problem": f"B=1, Hq={HEADS}, Hkv={KV_HEADS}, D={DIM}, causal; forward + backward",
        "methods": {"sdpa": "F.scaled_dot_product_attention(enable_gqa=True), plain backward",
                    "gim": "fastgim.attention(backend='torch', gim=GIMSettings()), GIM backward"},
        "backward_path": backward_path,
        "method": "both methods alternated in one process after one warm-up call each; ratio = median over "
                  "the pairs of gim / sdpa in the same pair (wall and process CPU time); load average "
                  "(1, 5, 15 min) before and after each row",
        "target_ratio": TARGET_RATIO,
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
