"""``fastgim chg``: fit Causal Head Gating masks on prompt/target pairs and write the results.

    fastgim chg --model DIR --data pairs.jsonl --out results/

``pairs.jsonl`` holds one JSON object per line with ``"text"`` (or ``"prompt"``) and ``"target"``.
Without ``--model`` the default model shipped with fastgim is used. ``--out`` receives
``chg_masks.safetensors``, ``chg_results.json`` (see :meth:`fastgim.chg.CHGResults.save`) and
``taxonomy.csv``; the summary is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``chg`` sub-command."""
    parser = subparsers.add_parser("chg", help="fit Causal Head Gating masks (facilitating / interfering heads)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the model shipped with fastgim)")
    parser.add_argument("--data", required=True, help="JSONL file of {\"text\": ..., \"target\": ...} pairs")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-masks", type=int, default=10)
    parser.add_argument("--num-updates", type=int, default=500, help="updates of the unregularised stage")
    parser.add_argument("--num-reg-updates", type=int, default=500, help="updates of each regularised stage")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--l1-weight", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Fit, save and print the summary; exit code 2 on bad input."""
    from fastgim.chg import CHGDataset
    from fastgim.lens import LensAPI

    data = Path(args.data)
    if not data.is_file():
        print(f"fastgim chg: --data {data} does not exist", file=sys.stderr)
        return 2
    try:
        lens = LensAPI.from_pretrained(args.model, device=args.device)
        dataset = CHGDataset.from_jsonl(data, lens.tokenizer, max_length=args.max_length)
        results = lens.fit_dataset(dataset, num_masks=args.num_masks, num_updates=args.num_updates,
                                   num_reg_updates=args.num_reg_updates, batch_size=args.batch_size,
                                   l1_weight=args.l1_weight, lr=args.lr, verbose=not args.quiet,
                                   threshold=args.threshold, seed=args.seed)
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        print(f"fastgim chg: {error}", file=sys.stderr)
        return 2
    out = results.save(args.out)
    results.head_taxonomy().to_csv(out / "taxonomy.csv", index=False)
    print(json.dumps(results.summary(), indent=1))
    return 0
