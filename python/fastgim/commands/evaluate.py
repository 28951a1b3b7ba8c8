"""``fastgim evaluate``: comprehensiveness / sufficiency of attribution methods on a JSONL data set.

Each line of ``--data`` is a JSON object with ``"text"`` (or ``"input_ids"``) and optionally
``"target"`` (a continuation string or token id; default: the model's prediction). Without
``--data`` the default model's held-out fact prompts are used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastgim.commands.explain import add_model_argument, load_model


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the CLI's sub-parsers."""
    parser = subparsers.add_parser("evaluate", help="faithfulness of attribution methods", description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--data", type=Path, default=None, metavar="FILE.jsonl",
                        help="examples, one JSON object per line (default: held-out fact prompts)")
    parser.add_argument("--methods", default="gim,gradient_x_input,integrated_gradients",
                        help="comma-separated methods (default gim,gradient_x_input,integrated_gradients)")
    parser.add_argument("--max-k", type=int, default=10, help="largest k for comprehensiveness (default 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    parser.add_argument("--n-steps", type=int, default=32, help="integrated gradients steps (default 32)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write per-method results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)
    return parser


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The examples of a JSONL file (blank lines skipped); errors name the line."""
    if not path.is_file():
        raise ValueError(f"--data {str(path)!r} does not exist")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(item, dict) or not ({"text", "input_ids"} & item.keys()):
            raise ValueError(f"{path}:{number}: each line must be an object with 'text' or 'input_ids'")
        examples.append(item)
    if not examples:
        raise ValueError(f"{path} has no examples")
    return examples


def run(args: argparse.Namespace) -> int:
    """Execute ``fastgim evaluate``; returns the exit code."""
    from fastgim.evaluation import evaluate

    try:
        if args.data is not None:
            examples = read_jsonl(args.data)
        else:
            from fastgim.data.facts import held_out_prompts

            examples = [{"text": p.prompt} for p in held_out_prompts()]
        examples = examples[: args.limit] if args.limit else examples
        model, tokenizer = load_model(args.model)
        result = evaluate(
            model, examples, methods=args.methods.split(","), tokenizer=tokenizer, max_k=args.max_k,
            batch_size=args.batch_size, method_kwargs={"integrated_gradients": {"n_steps": args.n_steps}},
            progress=not args.no_progress,
        )
    except ValueError as error:
        print(f"fastgim evaluate: {error}", file=sys.stderr)
        return 2
    print(result.to_markdown())
    if result.skipped:
        print(f"({result.skipped} examples skipped: fewer than 3 prompt tokens)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.summary(), indent=1), encoding="utf-8")
    return 0
