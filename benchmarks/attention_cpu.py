"""CPU timings of the ``torch`` attention backend (plain and GIM backward) against PyTorch SDPA.

Times forward + backward of ``fastgim.attention(..., backend="torch")`` with the ordinary backward
(``gim=False``) and with GIM's (``GIMSettings()``: T = 2 and the Q/K/V scales), and of
``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)``, for B=1, Hq=12, Hkv=4,
D=64, float32, sequence lengths 512, 1024, 2048, causal and bidirectional. Prints a table and writes
``benchmarks/results/attention_cpu.json``.

Each figure is the best of ``--reps`` runs, in wall-clock seconds and in process CPU seconds (the
latter is steadier on a shared machine; with ``--threads 1`` it is the single-core cost).

    python benchmarks/attention_cpu.py [--threads N] [--reps 5] [--lengths 512 1024 2048]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fastgim
from fastgim.settings import GIMSettings

RESULTS = Path(__file__).resolve().parent / "results" / "attention_cpu.json"


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


def best_time(fn: Callable[[], None], reps: int) -> tuple[float, float]:
    """Best (wall seconds, process CPU seconds) of ``reps`` calls after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def measure(length: int, causal: bool, reps: int, heads: tuple[int, int] = (12, 4), dim: int = 64) -> dict:
    hq, hkv = heads
    q = torch.randn(1, hq, length, dim, requires_grad=True)
    k = torch.randn(1, hkv, length, dim, requires_grad=True)
    v = torch.randn(1, hkv, length, dim, requires_grad=True)
    dout = torch.randn(1, hq, length, dim)
    runs = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
        "fastgim_plain": lambda: fastgim.attention(q, k, v, causal=causal, gim=False, backend="torch"),
        "fastgim_gim": lambda: fastgim.attention(q, k, v, causal=causal, gim=GIMSettings(), backend="torch"),
    }
    row: dict = {"length": length, "causal": causal, "hq": hq, "hkv": hkv, "dim": dim}
    for name, run in runs.items():
        with torch.no_grad():
            row[f"{name}_fwd_wall_s"], row[f"{name}_fwd_cpu_s"] = best_time(run, reps)
        row[f"{name}_fwdbwd_wall_s"], row[f"{name}_fwdbwd_cpu_s"] = best_time(lambda r=run: r().backward(dout), reps)
    for name in ("fastgim_plain", "fastgim_gim"):
        for clock in ("wall", "cpu"):
            row[f"{name}_fwdbwd_{clock}_vs_sdpa"] = row[f"{name}_fwdbwd_{clock}_s"] / row[f"sdpa_fwdbwd_{clock}_s"]
    return row


def print_table(rows: list[dict]) -> None:
    header = (f"{'N':>5} {'mask':>6} | {'SDPA fwd+bwd':>12} {'plain':>8} {'GIM':>8} | "
              f"{'plain/SDPA':>10} {'GIM/SDPA':>9} (wall; cpu in brackets)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['length']:>5} {'causal' if row['causal'] else 'full':>6} | "
              f"{row['sdpa_fwdbwd_wall_s']:>11.3f}s {row['fastgim_plain_fwdbwd_wall_s']:>7.3f}s "
              f"{row['fastgim_gim_fwdbwd_wall_s']:>7.3f}s | "
              f"{row['fastgim_plain_fwdbwd_wall_vs_sdpa']:>5.2f}x ({row['fastgim_plain_fwdbwd_cpu_vs_sdpa']:.2f}x) "
              f"{row['fastgim_gim_fwdbwd_wall_vs_sdpa']:>4.2f}x ({row['fastgim_gim_fwdbwd_cpu_vs_sdpa']:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(length, causal, args.reps) for length in args.lengths for causal in (False, True)]
    print_table(rows)
    report = {
        "benchmark": "attention_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastgim": fastgim.__version__,
        "dtype": "float32",
        "reps": args.reps,
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
