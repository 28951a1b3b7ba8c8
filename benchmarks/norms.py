"""Benchmark: fused norms and gated activation (Triton, CUDA extension) vs the unfused PyTorch path.

For each (rows, hidden) it times, per backend, RMSNorm and LayerNorm forward, frozen backward (GIM) and
ordinary backward, and the gated activation forward / GIM backward, and reports microseconds, achieved
GB/s (bytes that must move: each input read once, each output written once) and that as a percentage
of the measured copy bandwidth (``dst.copy_(src)`` of the same number of bytes). The unfused PyTorch
path is the model's own eager code (LlamaRMSNorm's forward; the frozen backward by autograd through a
detached statistic; ``F.silu(gate) * up``). Parameters do not require grad, as in GIM attribution.
Target on H100 / H200: forward and frozen backward at least 80% of copy bandwidth.

GPU:    python benchmarks/norms.py                   (bf16, rows 4096..65536, hidden 2048..8192)
CPU CI: python benchmarks/norms.py --smoke           (tiny sizes, torch backend, checks it runs)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--backends", nargs="+", default=None, choices=["triton", "cuda", "torch", "torch_unfused"],
                        help="default: triton cuda torch_unfused (--smoke: torch torch_unfused)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.hidden, args.dtype, args.repeats = [8], [64], "fp32", 2
        args.backends = args.backends or ["torch", "torch_unfused"]
        args.out = args.out or Path(tempfile.gettempdir())
    args.out = args.out or Path(__file__).parent / "results"
    args.backends = args.backends or ["triton", "cuda", "torch_unfused"]
    return args


def time_us(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median microseconds of ``fn``; on CUDA with events, after warm-up and with an L2 flush per call."""
    if device.type != "cuda":
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return statistics.median(samples)
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def _unfused_rms(x, w, eps, frozen):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    rstd = rstd.detach() if frozen else rstd
    return w * (x32 * rstd).to(x.dtype)


def _unfused_ln(x, w, b, eps, frozen):
    if not frozen:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)
    x32 = x.float()
    mean = x32.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x32 - mean).pow(2).mean(-1, keepdim=True) + eps).detach()
    return ((x32 - mean) * rstd * w.float() + b.float()).to(x.dtype)


def _fused(kind: str, backend: str) -> Callable:
    from fastgim.ops.norms import gated_activation, layer_norm, rms_norm

    if kind == "rms":
        return lambda x, w, eps, frozen: rms_norm(x, w, eps, frozen=frozen, backend=backend)
    if kind == "ln":
        return lambda x, w, b, eps, frozen: layer_norm(x, w, b, eps, frozen=frozen, backend=backend)
    return lambda g, u, scale: gated_activation(g, u, gate_scale=scale, up_scale=scale, backend=backend)


def _backward_timer(build: Callable[[], torch.Tensor], inputs: list[torch.Tensor], dy: torch.Tensor):
    out = build()
    return lambda: torch.autograd.grad(out, inputs, dy, retain_graph=True)


def bench_case(rows: int, hidden: int, dtype: torch.dtype, backend: str, repeats: int,
               device: torch.device) -> list[dict]:
    es = torch.empty((), dtype=dtype).element_size()
    n = rows * hidden
    x = torch.randn(rows, hidden, device=device, dtype=dtype).requires_grad_()
    dy = torch.randn_like(x)
    w = (torch.randn(hidden, device=device) * 0.1 + 1).to(dtype)
    b = torch.randn(hidden, device=device).to(dtype)
    gate = torch.randn_like(x).requires_grad_()
    unfused = backend == "torch_unfused"
    rms = (lambda x_, w_, eps, fr: _unfused_rms(x_, w_, eps, fr)) if unfused else _fused("rms", backend)
    ln = (lambda x_, w_, b_, eps, fr: _unfused_ln(x_, w_, b_, eps, fr)) if unfused else _fused("ln", backend)
    if unfused:
        def gated(g, u, scale):
            return torch.nn.functional.silu(g) * u
    else:
        gated = _fused("gated", backend)
    cases: list[tuple[str, Callable[[], object], int]] = []
    with torch.no_grad():
        cases.append(("rms_forward", lambda: rms(x, w, 1e-6, False), 2 * n * es))
        cases.append(("ln_forward", lambda: ln(x, w, b, 1e-5, False), 2 * n * es))
        cases.append(("gated_forward", lambda: gated(gate, x, 0.5), 3 * n * es))
    cases.append(("rms_backward_frozen", _backward_timer(lambda: rms(x, w, 1e-6, True), [x], dy), 3 * n * es))
    cases.append(("rms_backward", _backward_timer(lambda: rms(x, w, 1e-6, False), [x], dy), 3 * n * es))
    cases.append(("ln_backward_frozen", _backward_timer(lambda: ln(x, w, b, 1e-5, True), [x], dy), 3 * n * es))
    cases.append(("ln_backward", _backward_timer(lambda: ln(x, w, b, 1e-5, False), [x], dy), 3 * n * es))
    cases.append(("gated_backward", _backward_timer(lambda: gated(gate, x, 0.5), [gate, x], dy), 5 * n * es))
    results = []
    for name, fn, nbytes in cases:
        us = time_us(fn, repeats, device)
        results.append({"op": name, "backend": backend, "rows": rows, "hidden": hidden, "us": us,
                        "bytes": nbytes, "gbps": nbytes / us / 1e3})
    return results


def copy_gbps(nbytes: int, repeats: int, device: torch.device) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_us(lambda: dst.copy_(src), repeats, device) / 1e3


def _available(backend: str, device: torch.device) -> bool:
    if backend == "torch_unfused":
        return True
    from fastgim.ops.norms import _backend_available

    return _backend_available(backend, device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = DTYPES[args.dtype]
    backends = [b for b in args.backends if _available(b, device)]
    skipped = sorted(set(args.backends) - set(backends))
    if skipped:
        print(f"skipping unavailable backends on {device.type}: {', '.join(skipped)}")
    records = []
    es = torch.empty((), dtype=dtype).element_size()
    for rows in args.rows:
        for hidden in args.hidden:
            copy = copy_gbps(rows * hidden * es, args.repeats, device)
            for backend in backends:
                for rec in bench_case(rows, hidden, dtype, backend, args.repeats, device):
                    rec["copy_gbps"] = copy
                    rec["pct_of_copy"] = 100 * rec["gbps"] / copy
                    records.append(rec)
    _print_table(records)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "dtype": args.dtype, "time": datetime.datetime.now().isoformat()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"norms_{device.type}{'_smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps({"meta": meta, "results": records}, indent=1))
    print(f"wrote {path}")
    return 0


def _print_table(records: list[dict]) -> None:
    unfused = {(r["op"], r["rows"], r["hidden"]): r["us"] for r in records if r["backend"] == "torch_unfused"}
    print(f"{'op':<22}{'backend':<15}{'rows':>7}{'hidden':>7}{'us':>10}{'GB/s':>9}{'%copy':>7}{'vs torch':>9}")
    for r in records:
        base = unfused.get((r["op"], r["rows"], r["hidden"]))
        speedup = f"{base / r['us']:.2f}x" if base else "-"
        print(f"{r['op']:<22}{r['backend']:<15}{r['rows']:>7}{r['hidden']:>7}{r['us']:>10.1f}{r['gbps']:>9.1f}"
              f"{r['pct_of_copy']:>7.1f}{speedup:>9}")


if __name__ == "__main__":
    raise SystemExit(main())
