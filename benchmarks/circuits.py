"""Component attribution vs brute-force activation patching on the default model.

Component attribution needs one clean forward + one backward (+ one no-grad forward on the
corrupted input); brute-force patching needs one forward per component (``layers * (heads + 1)``)
plus the clean and corrupted runs. This script times both, reports the number of forward passes
and the rank agreement of the scores.

usage: python benchmarks/circuits.py [--repeats 5] [--device cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

import fastgim
from fastgim.circuits import activation_patching, component_attribution

CLEAN = ["The capital of France is", "The capital of Japan is"]
CORRUPTED = ["The capital of Italy is", "The capital of Egypt is"]


def _timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.flatten().argsort().argsort(), b.flatten().argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, tokenizer = fastgim.load_default_model()
    model = model.to(device).eval()
    clean = tokenizer(CLEAN, return_tensors="pt", padding=True).to(device)
    corrupted = tokenizer(CORRUPTED, return_tensors="pt", padding=True).to(device)
    if clean["input_ids"].shape != corrupted["input_ids"].shape:
        raise SystemExit("clean and corrupted prompts must tokenize to the same length")
    ids, mask = clean["input_ids"], clean["attention_mask"]
    with torch.no_grad():
        target = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[torch.arange(logits.shape[0]), -1, target].float().sum()

    common = {"attention_mask": mask, "corrupted_input_ids": corrupted["input_ids"], "metric": metric}
    t_plain, plain = _timed(lambda: component_attribution(model, ids, gim=None, **common), args.repeats, device)
    t_gim, gim = _timed(lambda: component_attribution(model, ids, **common), args.repeats, device)
    t_brute, truth = _timed(lambda: activation_patching(model, ids, corrupted["input_ids"], metric,
                                                        attention_mask=mask), max(1, args.repeats // 2), device)
    layers, heads = plain.heads.shape
    components = layers * (heads + 1)
    flat = lambda s: torch.cat([s.heads.flatten(), s.mlps])  # noqa: E731
    result = {
        "device": str(device), "torch": torch.__version__, "batch": list(ids.shape), "components": components,
        "forward_passes": {"component_attribution": "1 fwd + 1 bwd + 1 corrupted fwd",
                           "activation_patching": components + 2},
        "seconds": {"component_attribution_plain": t_plain, "component_attribution_gim": t_gim,
                    "activation_patching": t_brute},
        "speedup_vs_patching": {"plain": t_brute / t_plain, "gim": t_brute / t_gim},
        "spearman_vs_patching": {"plain": _spearman(flat(plain), flat(truth)), "gim": _spearman(flat(gim), flat(truth))},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
