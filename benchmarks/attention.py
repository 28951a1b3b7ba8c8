"""Benchmark: fused GIM attention (Triton) vs SDPA flash, a naive GIM and FlexAttention.

For each head_dim and sequence length it times forward, backward and forward + backward, reports
TFLOP/s (nominal FLOPs: 4 * B * Hq * Lq * Lk * D for the forward, halved when causal, and 2.5x that
for the backward, the same figure for every method so the rates compare) and the peak memory of
forward + backward, prints a table and writes everything to a JSON file.

Methods:
  gim_fused        fastgim.attention, triton backend, GIM on (T=2, scales 1/4, 1/4, 1/2)
  fused_plain      fastgim.attention, triton backend, GIM off (ordinary backward)
  sdpa_gim         fastgim.attention, sdpa backend, GIM on: GIM from PyTorch's own attention kernels
  sdpa_flash       torch SDPA restricted to the flash backend (plain), GQA via enable_gqa
  naive_gim        the materialised reference backend (scores in memory, temperature backward)
  flex             torch FlexAttention (compiled, plain), where present

GPU:    python benchmarks/attention.py            (B=2, Hq=32, Hkv=8, N=1k..16k, D=128 then 64, 256)
CPU CI: python benchmarks/attention.py --smoke    (tiny sizes, Triton interpreter, float32)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

GIM_ARGS = dict(temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5)
METHODS = ("gim_fused", "fused_plain", "sdpa_gim", "sdpa_flash", "naive_gim", "flex")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 64, 256])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--bidirectional", action="store_true", help="no causal mask")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--naive-max-len", type=int, default=4096, help="skip naive_gim above this length")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions (CPU timer)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (Triton interpreter) for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.q_heads, args.kv_heads = 1, 2, 1
        args.lengths, args.dims, args.dtype, args.repeats = [40], [32], "fp32", 1
        args.methods = [m for m in args.methods if m != "flex"]
        args.out = args.out or Path(tempfile.gettempdir())
    args.out = args.out or Path(__file__).parent / "results"
    return args


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Milliseconds per call: triton's do_bench on CUDA, a wall-clock loop elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn, _repeats: float(triton.testing.do_bench(fn, warmup=25, rep=100))

    def wall(fn: Callable[[], object], repeats: int) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) * 1000.0 / repeats

    return wall


def _attention_fn(method: str, causal: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    import fastgim
    from fastgim.settings import AttentionGIM

    if method in ("gim_fused", "fused_plain", "naive_gim", "sdpa_gim"):
        gim = AttentionGIM(**GIM_ARGS) if method != "fused_plain" else False
        backend = {"naive_gim": "reference", "sdpa_gim": "sdpa"}.get(method, "triton")
        return lambda q, k, v: fastgim.attention(q, k, v, causal=causal, gim=gim, backend=backend)
    if method == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        return sdpa
    return _flex_fn(causal)


def _flex_fn(causal: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    masks: dict = {}

    def flex(q, k, v):
        key = (q.shape[2], k.shape[2])
        if causal and key not in masks:
            shift = k.shape[2] - q.shape[2]
            masks[key] = create_block_mask(lambda b, h, i, j: j <= i + shift, None, None, *key, device=q.device)
        return compiled(q, k, v, block_mask=masks.get(key), enable_gqa=True)

    return flex


def _flops(args: argparse.Namespace, length: int, dim: int) -> tuple[float, float]:
    forward = 4.0 * args.batch * args.q_heads * length * length * dim
    if not args.bidirectional:
        forward /= 2
    return forward, 2.5 * forward


def measure(method: str, args: argparse.Namespace, length: int, dim: int, device: torch.device) -> dict:
    """Times and peak memory of one method at one size; ``error`` set when it could not run."""
    dtype = DTYPES[args.dtype]
    record: dict = {"method": method, "length": length, "dim": dim}
    if method == "naive_gim" and length > args.naive_max_len:
        return {**record, "error": f"skipped above --naive-max-len {args.naive_max_len}"}
    try:
        fn = _attention_fn(method, causal=not args.bidirectional)
        q = torch.randn(args.batch, args.q_heads, length, dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(args.batch, args.kv_heads, length, dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(args.batch, args.kv_heads, length, dim, device=device, dtype=dtype, requires_grad=True)
        dout = torch.randn(args.batch, args.q_heads, length, dim, device=device, dtype=dtype)
        timer = _timer(device)

        def forward_backward():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(dout)

        with torch.no_grad():
            record["fwd_ms"] = timer(lambda: fn(q, k, v), args.repeats)
        graph = [fn(q, k, v)]
        record["bwd_ms"] = timer(lambda: torch.autograd.grad(graph[0], (q, k, v), dout, retain_graph=True),
                                 args.repeats)
        graph.clear()  # free the retained graph before measuring memory
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward()
            torch.cuda.synchronize()
            record["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        record["fwd_bwd_ms"] = timer(forward_backward, args.repeats)
    except Exception as exc:  # an OOM or a missing backend is a result, not a crash
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**record, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    flops_fwd, flops_bwd = _flops(args, length, dim)
    record["fwd_tflops"] = flops_fwd / record["fwd_ms"] / 1e9
    record["bwd_tflops"] = flops_bwd / record["bwd_ms"] / 1e9
    record["fwd_bwd_tflops"] = (flops_fwd + flops_bwd) / record["fwd_bwd_ms"] / 1e9
    return record


def _environment(device: torch.device) -> dict:
    import transformers
    import triton

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if device.type == "cuda":
        env["capability"] = list(torch.cuda.get_device_capability(device))
    return env


def print_table(results: list[dict]) -> None:
    columns = ("method", "dim", "length", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_tflops", "bwd_tflops",
               "fwd_bwd_tflops", "peak_mem_mib")
    print(" ".join(f"{c:>14}" for c in columns))
    for row in results:
        if "error" in row:
            print(f"{row['method']:>14} {row['dim']:>14} {row['length']:>14}   {row['error']}")
            continue
        cells = [f"{row[c]:>14.3f}" if isinstance(row.get(c), float) else f"{row.get(c, '-')!s:>14}"
                 for c in columns]
        print(" ".join(cells))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: run with TRITON_INTERPRET=1 (and --smoke) to exercise the kernels on CPU",
              file=sys.stderr)
        return 2
    results = [measure(method, args, length, dim, device)
               for dim in args.dims for length in args.lengths for method in args.methods]
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"attention{'-smoke' if args.smoke else ''}-{stamp}.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"environment": _environment(device), "settings": settings,
                                "results": results}, indent=2))
    print(f"wrote {path}")
    failed = [r for r in results if "error" in r and r["method"] in ("gim_fused", "fused_plain")]
    return 1 if args.smoke and failed else 0


if __name__ == "__main__":
    if "--smoke" in sys.argv and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
