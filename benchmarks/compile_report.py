"""Compile report: every Triton kernel x every config it may be launched with, compiled ahead of time for
CUDA targets on a machine without a GPU (``fastgim.kernels.aot``).

Per compile it records registers per thread, spill bytes (``ptxas -v``), shared memory, num_warps and
num_stages, and flags compile errors, shared memory over the target's limit (sm_90 227 KiB, sm_80 163 KiB,
consumer sm_86/89 99 KiB noted for fp32) and spills. Attention: forward, dQ (with the D / stats
preprocessing) and dK/dV kernels x head_dim x dtype x feature sets (plain, GIM option A, option B, all
features with A / B) x the configs of the table that specialisation's launches use. Norms: RMSNorm and
LayerNorm forward / frozen and ordinary backward at each hidden size's block config, gated activation.

    python benchmarks/compile_report.py --arch 90 --arch 80 --json benchmarks/results/compile-report.json

Takes ~20-40 min on two loaded cores (``--workers``); ``--quick`` compiles head_dim 128 fp16 only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU target, before Triton is imported


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability x 10 (default 90 and 80)")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"], choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--features", nargs="+", default=None, help="attention feature sets (default all)")
    parser.add_argument("--kinds", nargs="+", default=["fwd", "dq", "dkdv"], help="attention kernels")
    parser.add_argument("--no-norms", action="store_true", help="skip the norm / activation kernels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="head_dim 128, fp16, sm_90 only")
    parser.add_argument("--json", type=Path, default=None, help="write the per-compile records here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here (default: next to --json)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="an earlier report JSON: reuse its records whose kernel source and Triton version match")
    args = parser.parse_args(argv)
    args.arch = args.arch or [90, 80]
    if args.quick:
        args.arch, args.head_dim, args.dtype = [90], [128], ["fp16"]
    if args.json and not args.markdown:
        args.markdown = args.json.with_suffix(".md")
    return args


def build_jobs(args: argparse.Namespace) -> list:
    from fastgim.kernels import aot

    features = args.features or list(aot.FEATURE_SETS)
    jobs = aot.attention_jobs(args.arch, args.head_dim, args.dtype, features, kinds=args.kinds)
    if not args.no_norms:
        jobs += aot.norm_jobs(args.arch, [d for d in args.dtype if d != "fp32"])
    return jobs


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.0f}"


def table(results: list) -> str:
    """Markdown: one row per compile, then a summary per (kernel, arch, size)."""
    from fastgim.kernels.aot import SMEM_LIMIT

    lines = ["| kernel | sm | dtype | size | features | BMxBN/warps/stages | regs | spill B | smem KiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        j = r.job
        note = "ERROR " + r.error.splitlines()[0][:80] if r.error else \
            ("SMEM > limit" if r.smem_over_limit else "spills" if r.spills else "")
        if j.dtype == "fp32" and r.shared is not None and r.shared > SMEM_LIMIT[86]:
            note = (note + "; " if note else "") + "> 99 KiB (consumer GPUs)"
        lines.append(f"| {j.kernel} | {j.arch} | {j.dtype} | {j.size} | {j.features} | {j.block_m}x{j.block_n}/"
                     f"{j.num_warps}/{j.num_stages} | {r.regs} | {r.spills} | {_kib(r.shared)} | {note} |")
    return "\n".join(lines)


def summary(results: list) -> dict:
    """Counts, spills per (arch, size) in half precision, shared-memory maxima per arch."""
    spills = defaultdict(lambda: [0, 0])
    smem_max: dict = {}
    for r in results:
        j = r.job
        if j.dtype in ("fp16", "bf16"):
            key = f"sm_{j.arch} {'attention' if j.kernel in ('fwd', 'dq', 'dkdv') else 'norms'} size {j.size}"
            spills[key][0] += 1
            spills[key][1] += bool(r.spills)
        if r.shared is not None:
            smem_max[f"sm_{j.arch} {j.dtype}"] = max(smem_max.get(f"sm_{j.arch} {j.dtype}", 0), r.shared)
    return {
        "compiles": len(results),
        "errors": sum(r.error is not None for r in results),
        "with_spills": sum(bool(r.spills) for r in results),
        "smem_over_limit": sum(r.smem_over_limit for r in results),
        "half_precision_spilling_of_compiles": {k: f"{v[1]}/{v[0]}" for k, v in sorted(spills.items())},
        "smem_max_kib": {k: round(v / 1024, 1) for k, v in sorted(smem_max.items())},
    }


def _priority(job) -> tuple:
    """Compile order (an interrupted run keeps the most telling part): norms, then bf16 / fp16 at head_dim 128,
    head_dim 256, head_dim 64, fp32 last."""
    if job.kernel not in ("fwd", "dq", "dkdv"):
        return (0,)
    return (job.dtype == "fp32", {128: 1, 256: 2, 64: 3}[job.size], job.dtype)


def _reusable(path: Path | None, hashes: dict) -> dict:
    """Results of ``path`` for jobs whose kernel source hash is unchanged (errors are compiled again)."""
    from fastgim.kernels.aot import Result

    if path is None or not path.exists():
        return {}
    out = {}
    for record in json.loads(path.read_text())["compiles"]:
        result = Result.from_dict(record)
        if result.job in hashes and record.get("source") == hashes[result.job] and not result.error:
            out[result.job] = result
    return out


def _write(args: argparse.Namespace, jobs: list, done: dict, hashes: dict, start: float, version: str) -> dict:
    """Summary of the results so far; written with the per-compile records to --json / --markdown."""
    results = [done[job] for job in jobs if job in done]
    info = summary(results)
    info.update(complete=len(results) == len(jobs), pending=len(jobs) - len(results), triton=version,
                seconds=round(time.perf_counter() - start),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node(), load_average=os.getloadavg())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        records = [dict(r.as_dict(), source=hashes[r.job]) for r in results]
        args.json.write_text(json.dumps({"summary": info, "compiles": records}, indent=1))
        args.markdown.write_text(f"# Compile report\n\n```json\n{json.dumps(info, indent=1)}\n```\n\n{table(results)}\n")
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import triton

    from fastgim.kernels import aot

    jobs = build_jobs(args)
    hashes = {job: aot.source_hash(job) for job in jobs}
    reused = _reusable(args.reuse, hashes)
    todo = sorted((job for job in jobs if job not in reused), key=_priority)
    print(f"{len(jobs)} compiles ({len(jobs) - len(todo)} reused), {args.workers} workers", file=sys.stderr)
    start = time.perf_counter()
    fresh = {}
    for i, result in enumerate(aot.compile_jobs(todo, args.workers), 1):
        fresh[result.job] = result
        flag = "ERROR" if result.error else "SPILL" if result.spills else ""
        print(f"[{i}/{len(todo)}] {result.job.label()} regs={result.regs} spill={result.spills} "
              f"smem={_kib(result.shared)}KiB {flag}", file=sys.stderr, flush=True)
        if args.json and i % 25 == 0:  # a partial report survives an interrupted run (--reuse resumes it)
            _write(args, jobs, {**reused, **fresh}, hashes, start, triton.__version__)
    info = _write(args, jobs, {**reused, **fresh}, hashes, start, triton.__version__)
    print(json.dumps(info, indent=1))
    if not args.json:
        print(table([{**reused, **fresh}[job] for job in jobs]))
    return 1 if info["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
