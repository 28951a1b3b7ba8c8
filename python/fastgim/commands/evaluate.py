"""Faithfulness of attribution methods on a JSONL data set (the GIM paper's protocol).

Each line of --data is a JSON object with "text" (or "input_ids") and optionally "target" (a
continuation string, or a token id; default: the model's top prediction) and "contrast" (a token
id or one-token string). Without --data the bundled model's held-out fact prompts are used.

Protocol (the GIM paper's, the default): the attribution ranks the prompt tokens between the first
and the last; comprehensiveness replaces the top-k tokens cumulatively by the baseline token for
k = 1..--max-k (50) and averages (f - f_k) / N; sufficiency keeps only the top 50/80/90/95/99 %
and averages (f - f_q) / N. f is the target value on the full input.

The target value f and its normaliser N depend on the kind of target:
  logit            (no "target", or a token id): f = the target logit, N = |f|, the full logit
                   (exactly the paper's protocol)
  logit difference ("contrast" given): f = target logit - contrast logit, N = |f|
  log-prob         ("target" is a string): f = sum of the continuation's log-probs. |f| is near 0
                   for a confident model, so N = f + m*ln(V), the log-prob above chance level
                   (m continuation tokens, V the vocabulary size): 1 = brought down to chance.
                   Continuations already at or below chance are skipped and counted.
Scores of different kinds are not comparable: a data set that mixes them gets one table per kind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastgim.commands._help import HelpFormatter
from fastgim.commands.explain import add_model_argument, load_model

DEFAULT_METHODS = "gim,gradient_x_input,integrated_gradients"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the CLI's sub-parsers."""
    parser = subparsers.add_parser("evaluate", help="faithfulness of attribution methods", description=__doc__,
                                   formatter_class=HelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--data", type=Path, default=None, metavar="FILE.jsonl",
                        help="examples, one JSON object per line (default: the bundled model's held-out fact "
                             "prompts)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated attribution methods")
    parser.add_argument("--max-k", type=int, default=50,
                        help="largest k for comprehensiveness (the top-k tokens are replaced cumulatively, "
                             "k = 1..K, as in the GIM paper)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    parser.add_argument("--n-steps", type=int, default=32, help="integrated gradients steps")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N examples (default: all)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help='write {target kind: {method: {"comprehensiveness", "sufficiency", ..._sem, "n"}}} '
                             "as JSON (default: none written)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress bar (it is shown only when stderr is a terminal)")
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
    from fastgim.evaluation import TARGET_KINDS, evaluate, target_kind

    try:
        if args.data is not None:
            examples = read_jsonl(args.data)
        else:
            from fastgim.data.facts import held_out_prompts

            examples = [{"text": p.prompt} for p in held_out_prompts()]
        examples = examples[: args.limit] if args.limit else examples
        model, tokenizer = load_model(args.model)
        groups: dict[str, list[dict[str, Any]]] = {}
        for example in examples:
            groups.setdefault(target_kind(example), []).append(example)
        results = {
            kind: evaluate(
                model, group, methods=args.methods.split(","), tokenizer=tokenizer, max_k=args.max_k,
                batch_size=args.batch_size, method_kwargs={"integrated_gradients": {"n_steps": args.n_steps}},
                progress=False if args.no_progress else None,
            )
            for kind, group in groups.items()
        }
    except ValueError as error:
        print(f"fastgim evaluate: {error}", file=sys.stderr)
        return 2
    for kind, result in results.items():
        if len(results) > 1:
            print(f"## {kind} targets ({len(groups[kind])} examples): {TARGET_KINDS[kind]}\n")
        print(result.to_markdown())
        for reason, count in result.skipped_reasons.items():
            print(f"({count} examples skipped: {reason})")
        print()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {kind: result.summary() for kind, result in results.items()}
        args.json.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return 0
