"""Fit Causal Head Gating (CHG) masks on prompt/target pairs and write the head taxonomy.

    fastgim chg --data pairs.jsonl --out results/            # the bundled model
    fastgim chg --model DIR --data pairs.jsonl --out results/

pairs.jsonl holds one JSON object per line with "text" (or "prompt") and "target", e.g.
{"text": "The capital of France is", "target": " Paris"}. The loss covers the target tokens.

Each head gets a gate in [0, 1]. Three stages train the gates of --num-masks independent masks:
an unregularised stage (--num-updates), then from its result a retention stage (pressure pushes
gates to 1) and a removal stage (pressure pushes gates to 0), --num-reg-updates each. A head is
facilitating when its removal gate stays >= --threshold, interfering when its retention gate falls
below it, irrelevant otherwise (ambiguous if both). Gates are averaged over the masks.

The defaults are sized for a quick run. On the bundled 4-layer, 16-head model with its 565
capital-fact prompts one run takes 41-44 s of one CPU thread (the same in wall time on an idle
machine). Keeping only the facilitating heads found retains 99.9 % of the target log-prob
gap between all heads on and all off. With the same seed, a run with twice the updates gives the
same label to 13 of the 16 heads; two seeds agree on 11 of 16, including every head that at least
75 % of the masks agree on in both, and twice the updates does not change that
(benchmarks/chg_cli_defaults.py, benchmarks/results/chg_cli_defaults.json). Heads with a low
"agreement" column in taxonomy.csv are interchangeable: different masks use different ones.
The Python API (fastgim.LensAPI.fit) keeps the reference CHG defaults: 10 masks, 500 updates
per stage, batch 32.

--out receives chg_masks.safetensors (the gates), chg_results.json (metrics and settings) and
taxonomy.csv (one row per head); the summary is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastgim.commands._help import HelpFormatter

# measured by benchmarks/chg_cli_defaults.py (see the description)
DEFAULT_NUM_MASKS = 10
DEFAULT_NUM_UPDATES = 50
DEFAULT_NUM_REG_UPDATES = 100
DEFAULT_BATCH_SIZE = 8


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``chg`` sub-command."""
    parser = subparsers.add_parser("chg", help="fit Causal Head Gating masks (facilitating / interfering heads)",
                                   description=__doc__,
                                   formatter_class=HelpFormatter)
    parser.add_argument("--model", metavar="DIR",
                        help="a Hugging Face causal LM directory (default: the model bundled with fastgim)")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl",
                        help='prompt/target pairs, one JSON object per line: {"text": ..., "target": ...}')
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--num-masks", type=int, default=DEFAULT_NUM_MASKS,
                        help="independent masks trained together; the taxonomy uses their mean gates and "
                             "reports how many masks agree per head")
    parser.add_argument("--num-updates", type=int, default=DEFAULT_NUM_UPDATES,
                        help="Adam updates of the unregularised stage")
    parser.add_argument("--num-reg-updates", type=int, default=DEFAULT_NUM_REG_UPDATES,
                        help="Adam updates of each regularised stage (retention and removal)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="prompts per update (the model sees batch size x masks rows)")
    parser.add_argument("--l1-weight", type=float, default=0.1,
                        help="lambda, the strength of the retention / removal pressure on the gate logits")
    parser.add_argument("--lr", type=float, default=1.0, help="Adam learning rate of the gate logits, all stages")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="a gate at or above it counts as on; in (0, 1)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate each prompt from the left to this many tokens, target included "
                             "(default: no truncation)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the gate initialisation and the batch order (default: not seeded)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (it is shown only when stderr is a terminal)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Fit, save and print the summary; exit code 2 on bad input."""
    from fastgim.chg import CHGDataset
    from fastgim.lens import LensAPI
    from fastgim.progress import interactive

    data = Path(args.data)
    if not data.is_file():
        print(f"fastgim chg: --data {data} does not exist", file=sys.stderr)
        return 2
    try:
        lens = LensAPI.from_pretrained(args.model, device=args.device)
        dataset = CHGDataset.from_jsonl(data, lens.tokenizer, max_length=args.max_length)
        results = lens.fit_dataset(dataset, num_masks=args.num_masks, num_updates=args.num_updates,
                                   num_reg_updates=args.num_reg_updates, batch_size=args.batch_size,
                                   l1_weight=args.l1_weight, lr=args.lr,
                                   verbose=not args.quiet and interactive(),
                                   threshold=args.threshold, seed=args.seed)
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        print(f"fastgim chg: {error}", file=sys.stderr)
        return 2
    out = results.save(args.out)
    results.head_taxonomy().to_csv(out / "taxonomy.csv", index=False)
    print(json.dumps(results.summary(), indent=1))
    return 0
