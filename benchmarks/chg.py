"""Benchmark: CHG training updates per second, fused gate (fastgim) vs inteprelens' o_proj hooks.

Both sides train the same gate logits on the same model, data, batch and number of masks
(unregularised stage, Adam, grad-norm clip 1.0):

* ``fastgim``: :class:`fastgim.chg.CHGTrainer`: gates applied in the attention op (``gim_fused``),
  several masks by repeating the batch, logits only at target positions.
* ``inteprelens``: ``inteprelens.CHGTrainer`` 0.2.1 as published (forward pre-hooks on every
  ``o_proj`` that reshape and scale the heads, SDPA attention, full-sequence logits, bf16
  autocast inside its loss, which on CPU is part of its cost).
* ``inteprelens_fp32``: inteprelens' own ``CHG.get_logp`` (the same hooks) driven by a plain fp32
  loop identical to fastgim's, isolating the gating mechanism from its autocast choice.

Model: the default fastgim model when it is shipped (else a random Llama of the same shape),
data: the fact prompts (capital relation) or random tokens. Each method is timed ``--repeats``
times interleaved (A B C A B C ...) after a warm-up; the median is reported.

usage: python benchmarks/chg.py [--batch-size 32] [--num-masks 4] [--updates 10] [--repeats 3]
                                [--threads 2] [--device cpu] [--out benchmarks/results/chg_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def load_model_and_data(device: str, batch_size: int):
    """The default model with its fact prompts, else a random Llama of the same shape and random prompts."""
    from fastgim.chg import CHGDataset

    try:
        import fastgim
        from fastgim.data import fact_prompts

        model, tokenizer = fastgim.load_default_model()
        prompts = [p for p in fact_prompts("train") if p.relation == "capital"]
        dataset = CHGDataset.from_texts([p.prompt for p in prompts], [p.answer for p in prompts], tokenizer)
        source = "fastgim default model, capital fact prompts"
    except Exception as error:  # the default model is optional for this benchmark
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
        model = LlamaForCausalLM(config)
        ids = torch.randint(3, 4096, (max(batch_size * 4, 64), 12))
        masks = torch.zeros_like(ids, dtype=torch.bool)
        masks[:, -1] = True
        dataset = CHGDataset.from_tokens(ids, masks, pad_token_id=0)
        source = f"random Llama (default model unavailable: {type(error).__name__})"
    model = model.float().to(device).eval()
    dataset = dataset.to(device)
    return model, dataset, source


def time_fastgim(model, dataset, args) -> float:
    from fastgim.chg import CHGTrainer

    trainer = CHGTrainer(model, dataset, num_masks=args.num_masks, batch_size=args.batch_size, seed=0)
    list(trainer.fit_stage("none", 1, show_progress=False))  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    list(trainer.fit_stage("none", args.updates, show_progress=False))
    _sync(args.device)
    return args.updates / (time.perf_counter() - start)


def _inteprelens_dataset(dataset):
    from inteprelens import CHGDataset as LensDataset

    return LensDataset.from_tokens(dataset.input_ids, dataset.loss_masks, dataset.pad_token_id)


def time_inteprelens(model, dataset, args) -> float:
    from inteprelens import CHGTrainer as LensTrainer

    model.set_attn_implementation("sdpa")
    trainer = LensTrainer(model, _inteprelens_dataset(dataset), num_masks=args.num_masks, batch_size=args.batch_size)
    list(trainer.fit_stage("none", 1, show_progress=False))
    _sync(args.device)
    start = time.perf_counter()
    list(trainer.fit_stage("none", args.updates, show_progress=False))
    _sync(args.device)
    return args.updates / (time.perf_counter() - start)


def time_inteprelens_fp32(model, dataset, args) -> float:
    from inteprelens import CHG as LensCHG

    model.set_attn_implementation("sdpa")
    chg = LensCHG(model)
    logits = chg.create_masks(num_masks=args.num_masks)
    optimizer = torch.optim.Adam([logits], lr=1.0)
    batches = dataset.training_batches(args.batch_size, seed=0)

    def update():
        optimizer.zero_grad()
        batch = next(batches)
        logp = chg.get_logp(logits.sigmoid(), batch["input_ids"], batch["loss_masks"], agg="mean")
        (-logp.mean(0).sum()).backward()
        torch.nn.utils.clip_grad_norm_(logits, 1.0)
        optimizer.step()

    update()
    _sync(args.device)
    start = time.perf_counter()
    for _ in range(args.updates):
        update()
    _sync(args.device)
    return args.updates / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-masks", type=int, default=4)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, dataset, source = load_model_and_data(args.device, args.batch_size)
    for param in model.parameters():
        param.requires_grad_(False)
    methods = {"fastgim": time_fastgim, "inteprelens": time_inteprelens, "inteprelens_fp32": time_inteprelens_fp32}
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            runs[name].append(fn(model, dataset, args))
    median = {name: statistics.median(values) for name, values in runs.items()}
    result = {
        "benchmark": "CHG training updates per second (unregularised stage)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
        "model": source, "num_layers": model.config.num_hidden_layers, "num_heads": model.config.num_attention_heads,
        "hidden_size": model.config.hidden_size, "batch_size": args.batch_size, "num_masks": args.num_masks,
        "rows_per_forward": args.batch_size * args.num_masks, "updates_per_run": args.updates,
        "repeats": args.repeats, "updates_per_s": median, "runs": runs,
        "speedup_vs_inteprelens": median["fastgim"] / median["inteprelens"],
        "speedup_vs_inteprelens_fp32": median["fastgim"] / median["inteprelens_fp32"],
    }
    out = Path(args.out) if args.out else RESULTS / f"chg_{'gpu' if args.device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("model", "updates_per_s", "speedup_vs_inteprelens",
                                             "speedup_vs_inteprelens_fp32")}, indent=1))
    return result


if __name__ == "__main__":
    main()
