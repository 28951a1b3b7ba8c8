"""CPU benchmark: ``fastgim.explain`` vs gim-explain 0.1.4 on a Llama-shaped model.

Model: 12 layers, hidden 768, 12 heads (4 KV heads), intermediate 2048, vocab 32000,
random weights, fp32, 2 threads. Each (method, N) runs in a fresh subprocess so that
peak memory (ru_maxrss above the resident size before the call) is not polluted by
other runs. Time is the median of ``--repeats`` calls after one warm-up call.

gim-explain runs as published: on ``sdpa`` attention (its default), it applies only
its Q/K/V rule to this model (its softmax patch never reaches SDPA, and its norm swap
does not know LlamaRMSNorm), so fastgim does strictly more work here: every rule.

usage: python benchmarks/explain_cpu.py [--lengths 512 2048] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _build_model(attn_implementation: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=8192,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model, config


def run_one(method: str, length: int, repeats: int) -> dict:
    """Runs in the child process: one method at one length."""
    import torch

    torch.set_num_threads(2)
    if method == "fastgim":
        import fastgim

        model, config = _build_model("gim_fused")

        def call(ids):
            return fastgim.explain(model, ids, baseline_token_id=0)
    elif method == "gim-explain":
        import gim

        model, config = _build_model("sdpa")

        def call(ids):
            model.zero_grad(set_to_none=True)
            return gim.explain(model, ids, baseline_token_id=0)
    else:
        raise ValueError(method)
    ids = torch.randint(1, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    before = _rss_bytes()
    call(ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(ids)
        times.append(time.perf_counter() - start)
    return {"method": method, "length": length, "seconds": statistics.median(times), "times": times,
            "peak_bytes": peak}


def _child(method: str, length: int, repeats: int) -> dict:
    command = [sys.executable, __file__, "--child", method, str(length), str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"method": method, "length": length, "error": result.stderr[-2000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "explain_cpu.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, length, repeats = args.child
        print(json.dumps(run_one(method, int(length), int(repeats))))
        return
    import torch
    import transformers

    rows = [_child(method, length, args.repeats) for length in args.lengths for method in ("fastgim", "gim-explain")]
    by_key = {(r["method"], r["length"]): r for r in rows}
    ratios = []
    for length in args.lengths:
        ours, theirs = by_key[("fastgim", length)], by_key[("gim-explain", length)]
        if "error" in ours or "error" in theirs:
            continue
        ratios.append({
            "length": length,
            "time_ratio": ours["seconds"] / theirs["seconds"],
            "peak_memory_ratio": ours["peak_bytes"] / theirs["peak_bytes"],
        })
    report = {
        "benchmark": "explain_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}), 2 threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "gim-explain": "0.1.4"},
        "model": "Llama-shaped: 12 layers, hidden 768, 12 heads / 4 KV heads, intermediate 2048, vocab 32000, fp32",
        "rows": rows,
        "ratios_fastgim_over_gim_explain": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'N':>6} {'method':>12} {'time s':>9} {'peak MB':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['length']:>6} {row['method']:>12}  ERROR {row['error'][-200:]}")
            continue
        print(f"{row['length']:>6} {row['method']:>12} {row['seconds']:>9.3f} {row['peak_bytes'] / 2**20:>9.1f}")
    for ratio in ratios:
        print(f"N={ratio['length']}: time {ratio['time_ratio']:.2f}x, peak memory {ratio['peak_memory_ratio']:.2f}x "
              "(fastgim / gim-explain)")


if __name__ == "__main__":
    main()
