"""Which ``fastgim chg`` defaults finish in minutes on the bundled model and still give a stable taxonomy?

For each configuration (masks, unregularised updates, regularised updates per stage, batch size)
and each seed, fit CHG exactly as ``fastgim chg`` does (``LensAPI.fit_dataset``) on the bundled
model's capital-fact prompts, and record the wall time and the head taxonomy (facilitating /
interfering / irrelevant / ambiguous per head, from the masks' mean gates, threshold 0.5). Then:

* ``seed_agreement``: fraction of heads with the same label in two seeds of one configuration;
* ``reference_agreement``: per seed, fraction of heads with the label that the reference
  (``--reference``, a longer run) gives with the same seed;
* ``works``: keeping only the facilitating heads retains over 80 % of the target log-prob gap
  between all heads on and all off (as ``benchmarks/chg_penalty.py``).

Threads: ``--threads`` (default 1). Both wall and CPU (process) seconds are recorded: on a
shared machine the wall time carries the load (``os.getloadavg()`` is recorded), while the CPU
time of one thread is what the run takes on an idle core.

usage: python benchmarks/chg_cli_defaults.py [--configs 10x50+100x8,4x50+100x16] [--reference 10x100+200x8]
                                             [--seeds 0,1] [--threads 1]
                                             [--out benchmarks/results/chg_cli_defaults.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DEFAULT_CONFIGS = "10x50+100x8,4x50+100x16"
DEFAULT_REFERENCE = "10x100+200x8"


def parse_config(text: str) -> dict[str, int]:
    """``MASKSxUPDATES+REG_UPDATESxBATCH`` -> dict (e.g. ``4x50+100x16``)."""
    masks, rest = text.split("x", 1)
    updates, rest = rest.split("+", 1)
    reg_updates, batch = rest.split("x", 1)
    return {"num_masks": int(masks), "num_updates": int(updates), "num_reg_updates": int(reg_updates),
            "batch_size": int(batch)}


def load_lens_and_data():
    import fastgim
    from fastgim.chg import CHGDataset
    from fastgim.data import fact_prompts
    from fastgim.lens import LensAPI

    model, tokenizer = fastgim.load_default_model()
    prompts = [p for p in fact_prompts("train") if p.relation == "capital"]
    dataset = CHGDataset.from_texts([p.prompt for p in prompts], [p.answer for p in prompts], tokenizer)
    return LensAPI(model.float(), tokenizer, device="cpu"), dataset


def fit(lens, dataset, config: dict[str, int], seed: int) -> dict:
    """One CHG fit as ``fastgim chg`` runs it: wall and CPU seconds, taxonomy labels, facilitating mask."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = lens.fit_dataset(dataset, seed=seed, verbose=False, **config)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    taxonomy = results.head_taxonomy()
    labels = taxonomy["taxonomy"].tolist()
    print(f"  {config} seed {seed}: {wall:.1f} s wall, {cpu:.1f} s CPU, load {os.getloadavg()[0]:.1f}", flush=True)
    return {"seed": seed, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "labels": labels,
            "head_agreement": [round(a, 3) for a in taxonomy["agreement"].tolist()],
            "facilitating": results.get_facilitating_mask(), "summary": results.summary()}


def retained_gap(lens, dataset, facilitating: torch.Tensor) -> float:
    """(logp(facilitating only) - logp(none)) / (logp(all) - logp(none)), mean target log-prob."""
    from fastgim.chg import CHG

    chg = CHG(lens.model)

    def logp(gates: torch.Tensor) -> float:
        with torch.no_grad():
            return float(chg.get_logp(gates, dataset.input_ids, dataset.loss_masks, agg="mean").mean())

    full, none = logp(torch.ones(chg.mask_shape)), logp(torch.zeros(chg.mask_shape))
    return (logp(facilitating) - none) / (full - none)


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def describe(lens, dataset, name: str, fits: list[dict]) -> dict:
    return {
        **parse_config(name),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
        "wall_seconds": [f["wall_seconds"] for f in fits],
        "cpu_seconds": [f["cpu_seconds"] for f in fits],
        "seed_agreement": agreement(fits[0]["labels"], fits[1]["labels"]) if len(fits) > 1 else None,
        "confident_seed_agreement": confident_agreement(fits),
        "retained_gap": [round(retained_gap(lens, dataset, f["facilitating"]), 4) for f in fits],
        "taxonomy_counts": [f["summary"].get("taxonomy_counts") for f in fits],
        "mean_mask_agreement": [round(f["summary"].get("mean_agreement", float("nan")), 4) for f in fits],
        "labels": [f["labels"] for f in fits],
        "head_agreement": [f["head_agreement"] for f in fits],
    }


def confident_agreement(fits: list[dict], level: float = 0.75) -> list[float] | None:
    """Seed agreement over the heads whose label at least ``level`` of the masks share in both seeds, and their count."""
    if len(fits) < 2:
        return None
    heads = [h for h in range(len(fits[0]["labels"]))
             if min(fits[0]["head_agreement"][h], fits[1]["head_agreement"][h]) >= level]
    same = sum(fits[0]["labels"][h] == fits[1]["labels"][h] for h in heads)
    return [same / len(heads) if heads else float("nan"), len(heads)]


def write(path: Path, report: dict) -> None:
    """Agreement of every configuration with the reference (when it has run), then the JSON."""
    reference = report["configs"].get(report["reference"])
    for entry in report["configs"].values():
        entry["reference_agreement"] = (None if reference is None else  # seed i against the reference's seed i
                                        [agreement(labels, reference["labels"][min(i, len(reference["labels"]) - 1)])
                                         for i, labels in enumerate(entry["labels"])])
    report["loadavg_after"] = os.getloadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for name, entry in report["configs"].items():
        print(name, json.dumps({k: v for k, v in entry.items() if k not in ("labels", "head_agreement")}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated MASKSxUPDATES+REG_UPDATESxBATCH")
    parser.add_argument("--reference", default=DEFAULT_REFERENCE,
                        help="the longer run to compare with ('' to skip it)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "chg_cli_defaults.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    lens, dataset = load_lens_and_data()
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "machine": platform.machine(), "threads": args.threads,
        "loadavg_before": os.getloadavg(), "data": f"bundled model, {len(dataset)} capital-fact train prompts",
        "reference": args.reference, "configs": {},
    }
    if args.out.exists():  # keep the configurations measured before and not re-run now
        report["configs"] = json.loads(args.out.read_text(encoding="utf-8")).get("configs", {})
    for name in [*args.configs.split(","), args.reference]:
        if name:
            runs = [fit(lens, dataset, parse_config(name), s) for s in seeds]
            report["configs"][name] = describe(lens, dataset, name, runs)
            write(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
