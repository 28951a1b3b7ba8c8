"""CPU benchmark: ``fastgim.explain`` vs plain gradient x input and gim-explain 0.1.4, Llama-shaped model.

Model: 12 layers, hidden 768, 12 heads (4 KV heads), intermediate 2048, vocab 32000,
random weights, fp32, 2 threads.

Methods (``--methods``; the first is compared with each of the others):

* ``fastgim``: ``fastgim.explain(model, ids, baseline_token_id=0)`` (every GIM rule);
* ``grad-x-input``: the floor: plain gradient x input of the same logit (the argmax at the last
  position) on SDPA attention, parameters' gradients off, logits computed at the last row only;
* ``gim-explain``: ``gim.explain`` from gim-explain 0.1.4 as published.

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

The load average (``os.getloadavg``) is recorded before and after each timing run: only numbers from
an idle machine (load well under the core count) measure the code.

usage: python benchmarks/explain_cpu.py [--lengths 512 2048] [--repeats 5] [--methods ...] [--out FILE]
       python benchmarks/explain_cpu.py --quick   # fastgim vs grad-x-input at N=2048, 5 pairs (~2 min idle)
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
METHODS = ("fastgim", "grad-x-input", "gim-explain")


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
    if method == "grad-x-input":
        model, config = _build_model("sdpa")
        model.requires_grad_(False)
        return _grad_x_input(model), config.vocab_size
    if method == "gim-explain":
        import gim

        model, config = _build_model("sdpa")

        def call(ids):
            model.zero_grad(set_to_none=True)
            return gim.explain(model, ids, baseline_token_id=0)

        return call, config.vocab_size
    raise ValueError(method)


def _grad_x_input(model):
    """Plain gradient x input of the argmax logit at the last position (logits at that row only)."""
    import torch

    embeddings = model.get_input_embeddings()

    def call(ids):
        with torch.enable_grad():
            with torch.no_grad():
                base = embeddings(torch.full_like(ids, 0))
            emb = embeddings(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=1).logits[0, -1]
            (grad,) = torch.autograd.grad(logits[logits.argmax()], emb)
        return (grad * (emb.detach() - base)).sum(-1)[0]

    return call


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


def run_times(length: int, repeats: int, methods: list[str]) -> dict:
    """In a child process: the methods' calls, alternated, after a warm-up call of each."""
    import torch

    torch.set_num_threads(2)
    callers = {method: _caller(method) for method in methods}
    times: dict[str, list[float]] = {method: [] for method in methods}
    for call, vocab in callers.values():
        call(_ids(length, vocab))
    load_before = os.getloadavg()
    for _ in range(repeats):
        for method, (call, vocab) in callers.items():
            ids = _ids(length, vocab)
            start = time.perf_counter()
            call(ids)
            times[method].append(time.perf_counter() - start)
    first = methods[0]
    ratios = {other: [ours / theirs for ours, theirs in zip(times[first], times[other])] for other in methods[1:]}
    return {"length": length, "times": times, "pair_ratios": ratios,
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


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


def _summary(length: int, timing: dict, memory: dict[str, dict], methods: list[str]) -> dict:
    row: dict = {"length": length}
    first = methods[0]
    if "error" not in timing:
        row["time_ratio"] = {f"{first}/{other}": statistics.median(r) for other, r in timing["pair_ratios"].items()}
        row["pair_ratios"] = timing["pair_ratios"]
        row["seconds"] = {method: statistics.median(timing["times"][method]) for method in methods}
        row["times"] = timing["times"]
        row["load_average_before"] = timing["load_average_before"]
        row["load_average_after"] = timing["load_average_after"]
    if memory and all("error" not in memory[method] for method in methods):
        row["peak_bytes"] = {method: memory[method]["peak_bytes"] for method in methods}
        row["peak_memory_ratio"] = {f"{first}/{other}": memory[first]["peak_bytes"] / memory[other]["peak_bytes"]
                                    for other in methods[1:]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory processes")
    parser.add_argument("--quick", action="store_true",
                        help="fastgim vs grad-x-input at N=2048, 5 pairs, with memory (~2 min on an idle 2-core box)")
    parser.add_argument("--out", type=Path, default=RESULTS / "explain_cpu.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "times":
            result = run_times(int(rest[0]), int(rest[1]), rest[2:])
        else:
            result = run_memory(rest[0], int(rest[1]))
        print(json.dumps(result))
        return
    if args.quick:
        args.lengths, args.repeats, args.methods = [2048], 5, ["fastgim", "grad-x-input"]
    import torch
    import transformers

    from fastgim.ops import attention_cpu

    methods = list(dict.fromkeys(args.methods))
    rows, errors = [], []
    for length in args.lengths:
        memory = {} if args.no_memory else {method: _child("memory", method, str(length)) for method in methods}
        timing = _child("times", str(length), str(args.repeats), *methods)
        errors += [r for r in (timing, *memory.values()) if "error" in r]
        rows.append(_summary(length, timing, memory, methods))
    report = {
        "benchmark": "explain_cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores), 2 threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "gim-explain": "0.1.4"},
        "attention_backward": attention_cpu.kernel_status(),
        "model": "Llama-shaped: 12 layers, hidden 768, 12 heads / 4 KV heads, intermediate 2048, vocab 32000, fp32",
        "methods": methods,
        "method": f"time: median over {args.repeats} alternated ({', '.join(methods)}) rounds of the per-round "
                  f"ratio {methods[0]} / other; load average (1, 5, 15 min) before and after the timed rounds; "
                  "memory: one call per fresh process with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 128 KiB",
        "rows": rows,
        "errors": errors,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for error in errors:
        print(f"ERROR {error['arguments']}: {error['error'][-300:]}")
    print(f"attention backward: {report['attention_backward']}")
    for row in rows:
        seconds = " ".join(f"{m} {s:.3f}s" for m, s in row.get("seconds", {}).items())
        load = row.get("load_average_before", [float("nan")])[0], row.get("load_average_after", [float("nan")])[0]
        print(f"N={row['length']}: {seconds}; load {load[0]:.2f} -> {load[1]:.2f}")
        for name, ratio in row.get("time_ratio", {}).items():
            pairs = " ".join(f"{r:.2f}" for r in row["pair_ratios"][name.split("/")[1]])
            memory = row.get("peak_memory_ratio", {}).get(name, float("nan"))
            print(f"  {name}: time {ratio:.2f}x (pairs {pairs}), peak memory {memory:.2f}x")


if __name__ == "__main__":
    main()
