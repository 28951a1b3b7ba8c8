"""CPU benchmark: ``fastgim.explain`` vs gim-explain 0.1.4 on a Llama-shaped model.

Model: 12 layers, hidden 768, 12 heads (4 KV heads), intermediate 2048, vocab 32000,
random weights, fp32, 2 threads.

* Time: one subprocess per N holds both models (same weights) and alternates the calls
  (fastgim, gim-explain, fastgim, ...) after a warm-up of each, so that the slow and fast
  phases of a shared machine hit both methods alike; the ratio is the median over the
  ``--repeats`` pairs of fastgim's time over gim-explain's in the same pair.
* Peak memory: each (method, N) runs one call in a fresh subprocess (ru_maxrss above the
  resident size before the call), so that nothing else pollutes it, with glibc's mmap and trim
  thresholds fixed (``MEMORY_ENV``) so that freed blocks do not stay resident.

gim-explain runs as published: on ``sdpa`` attention (its default), it applies only
its Q/K/V rule to this model (its softmax patch never reaches SDPA, and its norm swap
does not know LlamaRMSNorm), so fastgim does strictly more work here: every rule.

usage: python benchmarks/explain_cpu.py [--lengths 512 2048] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ("fastgim", "gim-explain")


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


def _caller(method: str):
    """``(call(ids), vocab size)`` for one method on its own copy of the model."""
    if method == "fastgim":
        import fastgim

        model, config = _build_model("gim_fused")
        return (lambda ids: fastgim.explain(model, ids, baseline_token_id=0)), config.vocab_size
    if method == "gim-explain":
        import gim

        model, config = _build_model("sdpa")

        def call(ids):
            model.zero_grad(set_to_none=True)
            return gim.explain(model, ids, baseline_token_id=0)

        return call, config.vocab_size
    raise ValueError(method)


def _ids(length: int, vocab: int):
    import torch

    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(1))


def run_memory(method: str, length: int) -> dict:
    """In a fresh child process: the peak memory of one call."""
    import torch

    torch.set_num_threads(2)
    call, vocab = _caller(method)
    ids = _ids(length, vocab)
    before = _rss_bytes()
    call(ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"method": method, "length": length, "peak_bytes": peak}


def run_times(length: int, repeats: int) -> dict:
    """In a child process: both methods' calls, alternated, after a warm-up call of each."""
    import torch

    torch.set_num_threads(2)
    callers = {method: _caller(method) for method in METHODS}
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for call, vocab in callers.values():
        call(_ids(length, vocab))
    for _ in range(repeats):
        for method, (call, vocab) in callers.items():
            ids = _ids(length, vocab)
            start = time.perf_counter()
            call(ids)
            times[method].append(time.perf_counter() - start)
    ratios = [ours / theirs for ours, theirs in zip(times["fastgim"], times["gim-explain"])]
    return {"length": length, "times": times, "pair_ratios": ratios}


#: glibc keeps freed large blocks resident (its mmap threshold adapts), so the peak RSS of the same
#: call varied by 30% from run to run; a fixed threshold returns them, and the peak follows live memory.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _child(*arguments: str) -> dict:
    command = [sys.executable, __file__, "--child", *arguments]
    env = {**os.environ, **MEMORY_ENV} if arguments[0] == "memory" else None
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        return {"arguments": list(arguments), "error": result.stderr[-2000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _summary(length: int, timing: dict, memory: dict[str, dict]) -> dict:
    row = {"length": length}
    if "error" not in timing:
        row["time_ratio"] = statistics.median(timing["pair_ratios"])
        row["pair_ratios"] = timing["pair_ratios"]
        row["seconds"] = {method: statistics.median(timing["times"][method]) for method in METHODS}
        row["times"] = timing["times"]
    if all("error" not in memory[method] for method in METHODS):
        row["peak_bytes"] = {method: memory[method]["peak_bytes"] for method in METHODS}
        row["peak_memory_ratio"] = memory["fastgim"]["peak_bytes"] / memory["gim-explain"]["peak_bytes"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "explain_cpu.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = run_times(int(rest[0]), int(rest[1])) if kind == "times" else run_memory(rest[0], int(rest[1]))
        print(json.dumps(result))
        return
    import torch
    import transformers

    rows, errors = [], []
    for length in args.lengths:
        memory = {method: _child("memory", method, str(length)) for method in METHODS}
        timing = _child("times", str(length), str(args.repeats))
        errors += [r for r in (timing, *memory.values()) if "error" in r]
        rows.append(_summary(length, timing, memory))
    report = {
        "benchmark": "explain_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}), 2 threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "gim-explain": "0.1.4"},
        "model": "Llama-shaped: 12 layers, hidden 768, 12 heads / 4 KV heads, intermediate 2048, vocab 32000, fp32",
        "method": f"time: median over {args.repeats} alternated (fastgim, gim-explain) pairs of the per-pair ratio; "
                  "memory: one call per fresh process with MALLOC_MMAP_THRESHOLD_ and "
                  "MALLOC_TRIM_THRESHOLD_ at 128 KiB",
        "rows": rows,
        "errors": errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for error in errors:
        print(f"ERROR {error['arguments']}: {error['error'][-300:]}")
    print(f"{'N':>6} {'fastgim s':>10} {'gim-explain s':>14} {'time ratio':>11} {'pairs':>28} {'memory ratio':>13}")
    for row in rows:
        seconds = row.get("seconds", {})
        pairs = " ".join(f"{r:.2f}" for r in row.get("pair_ratios", []))
        print(f"{row['length']:>6} {seconds.get('fastgim', float('nan')):>10.3f} "
              f"{seconds.get('gim-explain', float('nan')):>14.3f} {row.get('time_ratio', float('nan')):>10.2f}x "
              f"{pairs:>28} {row.get('peak_memory_ratio', float('nan')):>12.2f}x")


if __name__ == "__main__":
    main()
