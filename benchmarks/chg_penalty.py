"""Which CHG loss reduction finds heads that matter? Default (mean) vs the literal sums.

For each loss form and seed, fit CHG on the shipped default model's capital-fact prompts (the
prompts of ``tests/test_chg.py``), then measure the mean target log-prob with all heads on, all
off, only the facilitating heads on ("kept") and the facilitating heads off ("zeroed"). A fit
"works" when keeping only its facilitating heads retains over 80% of the log-prob gap between
all-off and all-on, and zeroing them loses over half of it.

Loss forms (``CHGTrainer(l1_reduction=, nll_reduction=)``):

* ``mean/mean``: the default, as the reference CHG code and inteprelens;
* ``sum-l1/mean-nll``: the issue's literal ``NLL - lambda * sum(clamp(logits))`` with a mean NLL;
* ``sum/sum``: the paper's ``-sum log P(y|x) - lambda * sum clamp(logit)`` on each batch.

usage: python benchmarks/chg_penalty.py [--seeds 8] [--updates 10] [--reg-updates 40]
                                        [--out benchmarks/results/chg_penalty.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
FORMS = {"mean/mean": ("mean", "mean"), "sum-l1/mean-nll": ("sum", "mean"), "sum/sum": ("sum", "sum")}


def fit_once(model, dataset, l1_reduction: str, nll_reduction: str, seed: int, args) -> dict:
    from fastgim.chg import CHG, CHGTrainer

    trainer = CHGTrainer(model, dataset, num_masks=1, batch_size=16, seed=seed, l1_reduction=l1_reduction,
                         nll_reduction=nll_reduction)
    history: dict[str, list[torch.Tensor]] = {}
    metrics = []
    for gates, record in trainer.fit(num_updates=args.updates, num_reg_updates=args.reg_updates, verbose=False):
        history.setdefault(record["regularization"], []).append(gates)
        metrics.append(record)
    results = trainer.results(history, metrics)
    facilitating = results.get_facilitating_mask()
    chg = CHG(model)

    def logp(gates: torch.Tensor) -> float:
        with torch.no_grad():
            return float(chg.get_logp(gates, dataset.input_ids, dataset.loss_masks, agg="mean").mean())

    full, none = logp(torch.ones(chg.mask_shape)), logp(torch.zeros(chg.mask_shape))
    kept, zeroed = logp(facilitating), logp(1 - facilitating)
    gap = full - none
    return {
        "seed": seed, "facilitating": int(facilitating.sum()), "full": full, "none": none, "kept": kept,
        "zeroed": zeroed, "works": (kept - none) / gap > 0.8 and (full - zeroed) / gap > 0.5,
        "removal_gates": results.final_masks("removal").squeeze(0).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--reg-updates", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS / "chg_penalty.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import fastgim
    from fastgim.chg import CHGDataset
    from fastgim.data import fact_prompts

    model, tokenizer = fastgim.load_default_model()
    model = model.float().eval()
    prompts = [p for p in fact_prompts("train") if p.relation == "capital"][::9]
    dataset = CHGDataset.from_texts([p.prompt for p in prompts], [p.answer for p in prompts], tokenizer)
    runs: dict[str, list[dict]] = {}
    for name, (l1_reduction, nll_reduction) in FORMS.items():
        runs[name] = [fit_once(model, dataset, l1_reduction, nll_reduction, seed, args) for seed in range(args.seeds)]
        works = sum(run["works"] for run in runs[name])
        print(f"{name:16s} works in {works}/{args.seeds} seeds; facilitating heads per seed: "
              f"{[run['facilitating'] for run in runs[name]]}; kept log-prob: "
              f"{[round(run['kept'], 2) for run in runs[name]]}", flush=True)
    record = {
        "date": datetime.date.today().isoformat(), "device": platform.processor() or platform.machine(),
        "torch": torch.__version__, "fastgim": fastgim.__version__, "prompts": len(prompts),
        "heads": int(torch.tensor(runs["mean/mean"][0]["removal_gates"]).numel()),
        "updates": args.updates, "reg_updates": args.reg_updates, "l1_weight": 0.1, "lr": 1.0, "batch_size": 16,
        "works": {name: sum(run["works"] for run in each) for name, each in runs.items()}, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
