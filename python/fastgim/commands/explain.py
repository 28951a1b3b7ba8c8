"""``fastgim explain``: attribute a model's prediction (or a given continuation) to the input tokens.

Prints the prediction and every token with its score (coloured in a terminal); optionally writes
an HTML page (``--html``), a PNG heatmap (``--png``) and a JSON file with the scores (``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastgim.methods import METHODS

LEVELS = ("token", "word", "sentence")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``explain`` on the CLI's sub-parsers."""
    parser = subparsers.add_parser("explain", help="attribute a prediction to the input tokens",
                                   description=__doc__)
    parser.add_argument("--text", required=True, help="the input text")
    add_model_argument(parser)
    parser.add_argument("--method", default="gim", choices=METHODS, help="attribution method (default gim)")
    parser.add_argument("--target", default=None,
                        help="a continuation to explain (teacher-forced, sum of log-probs); default: the prediction")
    parser.add_argument("--target-id", type=int, default=None, help="explain this token id's logit instead")
    parser.add_argument("--contrast", default=None, help="a one-token string: explain target minus contrast")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="explain the model's own greedy continuation of N tokens")
    parser.add_argument("--n-steps", type=int, default=32, help="integrated gradients steps (default 32)")
    parser.add_argument("--level", default="token", choices=LEVELS, help="aggregate scores to words or sentences")
    parser.add_argument("--html", type=Path, default=None, metavar="FILE", help="write an HTML page")
    parser.add_argument("--png", type=Path, default=None, metavar="FILE", help="write a PNG heatmap")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the scores as JSON")
    parser.add_argument("--top-k", type=int, default=20, metavar="K",
                        help="list at most K rows in the score table: the largest |score| first; 0 lists every "
                             "token in order (default 20)")
    parser.add_argument("--window", type=parse_window, default=None, metavar="START:END",
                        help="print only positions START..END-1 (a Python slice: --window=-50: is the last 50; "
                             "default: all); the files get every token")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (it is shown only when stderr is a terminal and the run is long)")
    parser.set_defaults(func=run)
    return parser


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model DIR`` (default: the model shipped with fastgim)."""
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a Hugging Face causal LM directory (default: fastgim's bundled model)")


def parse_window(text: str) -> tuple[int | None, int | None]:
    """``"START:END"`` (either may be empty or negative) -> ``(start, end)`` for ``Attribution.show``."""
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start.strip() else None, int(end) if end.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 0:40 or -50:), got {text!r}") from None


def load_model(directory: str | None) -> tuple[Any, Any]:
    """(model, tokenizer) from ``directory``, or fastgim's default model when ``None``; eval mode.

    Raises :class:`fastgim.loading.ModelLoadError` (a ``ValueError``) with a clear message on bad input.
    """
    from fastgim.loading import load_model as load

    return load(directory)


def run(args: argparse.Namespace) -> int:
    """Execute ``fastgim explain``; returns the exit code."""
    from fastgim.attribution import attribute

    if not args.text.strip():
        print("fastgim explain: --text is empty; give the text to explain", file=sys.stderr)
        return 2
    if args.top_k < 0:
        print(f"fastgim explain: --top-k must be >= 0 (0 lists every token), got {args.top_k}", file=sys.stderr)
        return 2
    if args.target is not None and args.target_id is not None:
        print("fastgim explain: give --target or --target-id, not both", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_model(args.model)
        result = attribute(
            model, args.text, tokenizer=tokenizer, method=args.method,
            target=args.target if args.target is not None else args.target_id,
            contrast=args.contrast, generate=args.generate > 0, max_new_tokens=max(args.generate, 1),
            n_steps=args.n_steps, progress=False if args.no_progress else None,
        )
    except (ValueError, TypeError, FloatingPointError) as error:  # fastgim.validation's input errors
        print(f"fastgim explain: {error}", file=sys.stderr)
        return 2
    if args.level == "word":
        result = result.to_words()
    elif args.level == "sentence":
        result = result.to_sentences()
    write_outputs(result, html=args.html, png=args.png, json_path=args.json)
    try:
        result.show(top_k=args.top_k or None, window=args.window)
    except ValueError as error:
        print(f"fastgim explain: {error}", file=sys.stderr)
        return 2
    return 0


def write_outputs(result: Any, *, html: Path | None, png: Path | None, json_path: Path | None) -> None:
    """Write the requested HTML / PNG / JSON files for an :class:`fastgim.Attribution`."""
    for path in (html, png, json_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if html is not None:
        html.write_text(result.to_html(), encoding="utf-8")
    if png is not None:
        result.plot(png)
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
