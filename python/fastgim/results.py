"""The :class:`Attribution` result: scores per token, display, aggregation and exact save / load.

An :class:`Attribution` holds one sequence's token attributions as produced by
:func:`fastgim.attribute`:

* ``tokens``: the model input's tokens as the tokenizer names them (``convert_ids_to_tokens``),
* ``pieces``: the text each token contributes (what is displayed; words are built from these),
* ``scores``: float32 tensor ``[seq]``, the attribution of the whole target to each token,
* ``target_scores``: float32 tensor ``[n_target, seq]`` with one row per target token for
  multi-token targets (string continuations, generated text), else ``None``,
* ``prediction``, ``method``, ``settings`` (the method's parameters) and ``target`` (a description).

Scores are signed: positive = the token pushes the target up.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
SHOW_TOP_K = 20  # Attribution.show lists at most this many rows by default
METHOD_NAMES = {
    "gim": "GIM",
    "gim_freeze_norm": "GIM (norm freezing only)",
    "gim_temperature": "GIM (softmax temperature only)",
    "gim_qkv_scale": "GIM (Q/K/V gradient scaling only)",
    "gim_mlp_scale": "GIM (MLP gradient scaling only)",
    "gradient_x_input": "Gradient x input",
    "saliency": "Saliency (gradient norm)",
    "integrated_gradients": "Integrated gradients",
    "occlusion": "Occlusion",
    "random": "Random scores (control)",
}
LEVELS = ("token", "word", "sentence")
_TENSOR_FIELDS = ("scores", "target_scores")
_SENTENCE_END = re.compile(r"[.!?]['\")\]]*\s*$|\n\s*$")


@dataclasses.dataclass
class Attribution:
    """Token attributions for one sequence (see the module docstring for the fields).

    ``scores`` is float32 ``[seq]``; ``target_scores`` float32 ``[n_target, seq]`` or ``None``;
    ``target_tokens`` names the rows of ``target_scores``. ``prompt_length`` is the number of
    leading tokens that came from the user's input (the rest are teacher-forced target tokens).
    ``level`` is ``"token"``, ``"word"`` or ``"sentence"``.
    """

    tokens: list[str]
    pieces: list[str]
    token_ids: list[int]
    scores: torch.Tensor
    method: str
    target: str = ""
    prediction: str | None = None
    target_value: float | None = None
    target_tokens: list[str] = dataclasses.field(default_factory=list)
    target_scores: torch.Tensor | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    prompt_length: int | None = None
    level: str = "token"

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.pieces) != n or self.scores.shape != (n,):
            raise ValueError(
                f"Attribution needs one piece and one score per token: {n} tokens, {len(self.pieces)} pieces, "
                f"scores of shape {tuple(self.scores.shape)}"
            )
        if self.target_scores is not None and (
            self.target_scores.dim() != 2 or self.target_scores.shape[1] != n
        ):
            raise ValueError(f"target_scores must be [n_target, {n}], got {tuple(self.target_scores.shape)}")
        if self.prompt_length is None:
            self.prompt_length = n
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")

    def __len__(self) -> int:
        return len(self.tokens)

    # ------------------------------------------------------------------ comparison
    def equals(self, other: Attribution) -> bool:
        """Exact equality of every field (tensors bit for bit)."""
        if not isinstance(other, Attribution):
            return False
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                    return False
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    # ------------------------------------------------------------------ aggregation
    def to_words(self) -> Attribution:
        """Sum the scores of the tokens of each whitespace-delimited word (special tokens stay alone)."""
        return self._aggregate(_word_groups(self.pieces), "word")

    def to_sentences(self) -> Attribution:
        """Sum the scores of each sentence (ends after ``.``, ``!``, ``?`` or a newline)."""
        words = self.to_words() if self.level == "token" else self
        groups: list[list[int]] = [[]]
        for i, piece in enumerate(words.pieces):
            groups[-1].append(i)
            if _SENTENCE_END.search(piece) and i < len(words.pieces) - 1:
                groups.append([])
        return words._aggregate(groups, "sentence")

    def _aggregate(self, groups: list[list[int]], level: str) -> Attribution:
        index = torch.tensor([g for g, members in enumerate(groups) for _ in members])
        order = torch.tensor([i for members in groups for i in members])

        def pool(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros((*x.shape[:-1], len(groups)))
            return out.index_add_(-1, index, x[..., order])

        prompt_groups = sum(1 for members in groups if members[0] < (self.prompt_length or 0))
        return dataclasses.replace(
            self,
            tokens=["".join(self.tokens[i] for i in m) for m in groups],
            pieces=["".join(self.pieces[i] for i in m) for m in groups],
            token_ids=[self.token_ids[m[0]] for m in groups],
            scores=pool(self.scores),
            target_scores=None if self.target_scores is None else pool(self.target_scores),
            prompt_length=prompt_groups,
            level=level,
        )

    # ------------------------------------------------------------------ save / load
    def to_dict(self, *, include_scores: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict; scores as lists of floats (exact for float32) when asked."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _TENSOR_FIELDS:
                if include_scores:
                    out[field.name] = None if value is None else value.tolist()
            else:
                out[field.name] = value
        return out

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.json`` (tokens, metadata) and ``<path>.safetensors`` (score tensors).

        ``path`` may end in ``.json`` or ``.safetensors`` or have no suffix. Returns both paths.
        :meth:`load` restores an :class:`Attribution` that :meth:`equals` this one exactly.
        """
        from safetensors.torch import save_file

        json_path, tensor_path = _paths(path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.to_dict(include_scores=False)
        meta["tensors"] = tensor_path.name
        json_path.write_text(json.dumps(meta, indent=1, allow_nan=True))
        tensors = {"scores": self.scores.detach().cpu().contiguous()}
        if self.target_scores is not None:
            tensors["target_scores"] = self.target_scores.detach().cpu().contiguous()
        save_file(tensors, str(tensor_path))
        return json_path, tensor_path

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        """Read an attribution written by :meth:`save` (give either file or the common stem)."""
        from safetensors.torch import load_file

        json_path, _ = _paths(path)
        if not json_path.exists():
            raise FileNotFoundError(f"no saved attribution at {json_path} (write one with Attribution.save)")
        meta = json.loads(json_path.read_text())
        version = meta.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{json_path} has format version {version!r}; this fastgim reads {FORMAT_VERSION}")
        tensors = load_file(str(_tensor_file(json_path, meta.pop("tensors", None))))
        return cls(**meta, scores=tensors["scores"], target_scores=tensors.get("target_scores"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attribution:
        """Inverse of :meth:`to_dict` (with scores)."""
        data = dict(data)
        data.pop("format_version", None)
        target_scores = data.pop("target_scores", None)
        return cls(
            **{k: v for k, v in data.items() if k != "scores"},
            scores=torch.tensor(data["scores"], dtype=torch.float32),
            target_scores=None if target_scores is None else torch.tensor(target_scores, dtype=torch.float32),
        )

    # ------------------------------------------------------------------ display
    def show(self, console: Any = None, *, top_k: int | None = SHOW_TOP_K,
             window: tuple[int | None, int | None] | None = None) -> None:
        """Print the prediction, the coloured tokens (red = positive, blue = negative) and a score table.

        Args:
            console: a ``rich.console.Console`` (default: a new one on stdout).
            top_k: the table lists at most ``top_k`` rows: the tokens with the largest ``|score|``,
                largest first. Inputs of up to ``top_k`` tokens are listed in full, in order;
                ``None`` or 0 lists every token.
            window: ``(start, end)`` positions (slice semantics: negative counts from the end,
                ``None`` is open): only these tokens appear in the coloured text and the table.
                Colours keep the scale of the whole sequence. Positions count tokens, or words /
                sentences after :meth:`to_words` / :meth:`to_sentences`.
        """
        from rich.console import Console

        console = console or Console()
        for renderable in rich_renderables(self, top_k=top_k, window=window):
            console.print(renderable)

    def to_html(self, *, title: str | None = None) -> str:
        """A self-contained HTML page: tokens on a diverging colour scale, exact values on hover."""
        return html_page(self, title=title)

    def plot(self, path: str | Path, *, dpi: int = 120, tokens_per_row: int = 60) -> Path:
        """Save a matplotlib PNG heatmap (rows: total, then one per target token) to ``path``.

        Long inputs wrap into panels of ``tokens_per_row`` tokens; a horizontal colour bar under the
        panels has ticks from the most negative to the most positive value of the symmetric scale
        ``[-max|score|, +max|score|]``. :func:`heatmap_figure` returns the figure instead.
        """
        return plot_heatmap(self, Path(path), dpi=dpi, tokens_per_row=tokens_per_row)


def _tensor_file(json_path: Path, name: Any) -> Path:
    """The tensors file a saved JSON names: a plain file name in the JSON's own folder, nothing else."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(
            f"{json_path} names its tensors file as {name!r}; it must be a file name in the same folder "
            "(as Attribution.save writes it), not a path"
        )
    return json_path.parent / name


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def _word_groups(pieces: list[str]) -> list[list[int]]:
    groups: list[list[int]] = []
    previous_special = True
    for i, piece in enumerate(pieces):
        special = _is_special(piece)
        if not groups or special or previous_special or piece[:1].isspace():
            groups.append([i])
        else:
            groups[-1].append(i)
        previous_special = special
    return groups


def _is_special(piece: str) -> bool:
    return bool(re.fullmatch(r"<[^<>\s]+>|\[[A-Z]+\]|<\|[^|]+\|>", piece))


def colour(value: float, scale: float) -> tuple[int, int, int]:
    """Diverging colour for ``value / scale`` in [-1, 1]: blue (negative), white (0), red (positive)."""
    x = 0.0 if scale <= 0 or not math.isfinite(value) else max(-1.0, min(1.0, value / scale))
    strong = (178, 24, 43) if x >= 0 else (33, 102, 172)
    t = abs(x)
    return tuple(round(255 + (c - 255) * t) for c in strong)  # type: ignore[return-value]


def escape(text: str) -> str:
    """HTML-escape a piece and make its whitespace visible."""
    return html.escape(text).replace("\n", "&#x21b5;<br>")


def _scale(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _describe(attr: Attribution) -> list[str]:
    lines = [f"method: {attr.method}"]
    if attr.target:
        lines.append(f"target: {attr.target}")
    if attr.prediction is not None:
        lines.append(f"prediction: {attr.prediction!r}")
    if attr.target_value is not None:
        lines.append(f"target value: {attr.target_value:.6g}")
    return lines


def shown_rows(attr: Attribution, *, top_k: int | None = SHOW_TOP_K,
               window: tuple[int | None, int | None] | None = None) -> tuple[list[int], list[int]]:
    """Positions :meth:`Attribution.show` prints: (the coloured text's, the table's, in table order)."""
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: every row), got {top_k}")
    positions = list(range(len(attr)))
    if window is not None:
        if len(window) != 2:
            raise ValueError(f"window must be (start, end), got {window!r}")
        positions = positions[slice(*window)]
        if not positions:
            raise ValueError(f"window {tuple(window)} selects no {attr.level} of the {len(attr)}")
    if not top_k or len(positions) <= top_k:
        return positions, positions
    scores = attr.scores.tolist()
    ranked = sorted(positions, key=lambda i: -abs(scores[i]) if math.isfinite(scores[i]) else math.inf)
    return positions, ranked[:top_k]


def rich_renderables(attr: Attribution, *, top_k: int | None = SHOW_TOP_K,
                     window: tuple[int | None, int | None] | None = None) -> list[Any]:
    """The rich objects :meth:`Attribution.show` prints: header, coloured text, score table."""
    from rich.table import Table
    from rich.text import Text

    text_positions, table_positions = shown_rows(attr, top_k=top_k, window=window)
    scale = _scale(attr.scores)
    scores = attr.scores.tolist()
    text = Text()
    if text_positions[0] > 0:
        text.append(f"[... {text_positions[0]} before] ", style="dim")
    for i in text_positions:
        r, g, b = colour(scores[i], scale)
        style = f"black on rgb({r},{g},{b})" + (" underline" if i >= (attr.prompt_length or 0) else "")
        text.append(attr.pieces[i], style=style)
    if text_positions[-1] < len(attr) - 1:
        text.append(f" [... {len(attr) - 1 - text_positions[-1]} after]", style="dim")
    title = f"{attr.level} attributions"
    if len(table_positions) < len(text_positions):
        title = f"top {len(table_positions)} of {len(text_positions)} {attr.level}s by |score|"
    # Strings go in as Text, never as markup: a token such as "[/]" or "[bold red]" is shown as written.
    table = Table(title=Text(title), show_lines=False)
    table.add_column("#", justify="right")
    table.add_column(Text(attr.level))
    table.add_column("score", justify="right")
    for i in table_positions:
        r, g, b = colour(scores[i], scale)
        table.add_row(str(i), Text(repr(attr.pieces[i])),
                      Text(f"{scores[i]:+.4g}", style=f"black on rgb({r},{g},{b})"))
    return [Text("\n".join(_describe(attr)), style="bold"), text, table]


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#222}
.tokens{font-family:ui-monospace,monospace;font-size:18px;line-height:2.2;white-space:pre-wrap}
.tok{position:relative;padding:2px 1px;border-radius:3px;cursor:default}
.tok.target{text-decoration:underline dotted}
.tok:hover::after{content:attr(data-score);position:absolute;left:0;top:-1.9em;background:#222;color:#fff;
 font-size:12px;padding:1px 5px;border-radius:3px;white-space:nowrap;z-index:2}
.legend{display:flex;align-items:center;gap:.5em;margin:1em 0;font-size:13px}
.bar{width:16em;height:12px;background:linear-gradient(to right,rgb(33,102,172),#fff,rgb(178,24,43))}
table{border-collapse:collapse;margin-top:1em;font-size:13px}td,th{padding:2px 6px;border:1px solid #ddd}
"""


def _token_spans(attr: Attribution, values: list[float], scale: float) -> str:
    spans = []
    for i, (piece, value) in enumerate(zip(attr.pieces, values)):
        r, g, b = colour(value, scale)
        cls = "tok target" if i >= (attr.prompt_length or 0) else "tok"
        label = html.escape(f"#{i} {piece!r}: {value:+.6g}", quote=True)  # the decoded text, not Ġ-pieces
        ink = "#fff" if scale > 0 and abs(value) > 0.6 * scale else "#111"
        spans.append(
            f'<span class="{cls}" style="background:rgb({r},{g},{b});color:{ink}" title="{label}" '
            f'data-score="{label}">{escape(piece)}</span>'
        )
    return "".join(spans)


def html_page(attr: Attribution, *, title: str | None = None) -> str:
    """The page :meth:`Attribution.to_html` returns (no external resources)."""
    scale = _scale(attr.scores)
    body = [f"<h1>{html.escape(title or 'fastgim attribution')}</h1>"]
    body += [f"<div>{html.escape(line)}</div>" for line in _describe(attr)]
    body.append(
        f'<div class="legend"><span>{-scale:+.3g}</span><span class="bar"></span><span>{scale:+.3g}</span>'
        "<span>(blue: against the target, red: for it; hover for values)</span></div>"
    )
    body.append(f'<div class="tokens" id="total">{_token_spans(attr, attr.scores.tolist(), scale)}</div>')
    if attr.target_scores is not None and attr.target_tokens:
        row_scale = _scale(attr.target_scores)
        body.append("<h2>Per target token</h2>")
        for name, row in zip(attr.target_tokens, attr.target_scores.tolist()):
            body.append(f"<h3>{escape(repr(name))}</h3>")
            body.append(f'<div class="tokens">{_token_spans(attr, row, row_scale)}</div>')
    rows = "".join(
        f"<tr><td>{i}</td><td>{escape(repr(p))}</td><td>{v:+.6g}</td></tr>"
        for i, (p, v) in enumerate(zip(attr.pieces, attr.scores.tolist()))
    )
    body.append(f"<table><tr><th>#</th><th>{html.escape(attr.level)}</th><th>score</th></tr>{rows}</table>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title or 'fastgim attribution')}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def plot_heatmap(attr: Attribution, path: Path, *, dpi: int = 120, tokens_per_row: int = 60) -> Path:
    """Draw the heatmap :meth:`Attribution.plot` saves (matplotlib, Agg backend)."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(attr, tokens_per_row=tokens_per_row)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def heatmap_figure(attr: Attribution, *, tokens_per_row: int = 60) -> Any:
    """The matplotlib figure of :meth:`Attribution.plot`; its last axes is the colour bar.

    Sizes are fixed in inches (cells 0.42 in wide, a 6 in colour bar), so text stays readable
    whatever the input length; long inputs wrap into panels of ``tokens_per_row`` tokens.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import FuncFormatter

    if tokens_per_row < 1:
        raise ValueError(f"tokens_per_row must be >= 1, got {tokens_per_row}")
    rows, labels = [attr.scores], ["total"]
    if attr.target_scores is not None and attr.target_tokens:
        rows += list(attr.target_scores)
        labels += [_short(repr(t)) for t in attr.target_tokens]
    data = torch.stack(rows).float().numpy()
    scale = _scale(torch.from_numpy(data)) or 1.0
    norm = TwoSlopeNorm(0.0, -scale, scale)
    starts = list(range(0, len(attr), tokens_per_row))
    columns = min(len(attr), tokens_per_row)
    layout = _HeatmapLayout(columns=columns, rows=len(rows), panels=len(starts))
    fig = plt.figure(figsize=(layout.width, layout.height))
    fig.suptitle(_plot_title(attr, layout.width), fontsize=11, y=1 - 0.12 / layout.height, va="top")
    image = None
    for panel, start in enumerate(starts):
        ax = fig.add_axes(layout.panel_box(panel))
        stop = min(start + tokens_per_row, len(attr))
        image = ax.imshow(data[:, start:stop], cmap="RdBu_r", norm=norm, aspect="auto",
                          extent=(start - 0.5, stop - 0.5, len(rows) - 0.5, -0.5))
        ax.set_xlim(start - 0.5, start + columns - 0.5)
        ax.set_xticks(range(start, stop), [_short(p.replace("\n", "\\n")) for p in attr.pieces[start:stop]],
                      rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
        ax.set_yticks(range(len(rows)), labels, fontsize=9)
    cax = fig.add_axes(layout.colourbar_box())
    bar = fig.colorbar(image, cax=cax, orientation="horizontal")
    bar.set_ticks([float(x) for x in torch.linspace(-scale, scale, 5)])
    bar.ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:+.3g}" if x else "0"))
    bar.ax.tick_params(labelsize=9)
    bar.set_label("attribution score (red: pushes the target up, blue: down)", fontsize=9)
    return fig


@dataclasses.dataclass
class _HeatmapLayout:
    """Box positions (figure fractions) for ``panels`` heatmap panels and a colour bar, sized in inches."""

    columns: int
    rows: int
    panels: int
    cell: float = 0.42  # inches per token column
    row_height: float = 0.42
    left: float = 1.6  # y labels
    right: float = 0.4
    title: float = 0.75
    labels: float = 1.0  # rotated token labels under each panel
    bar_height: float = 0.2
    bar_space: float = 0.8  # the colour bar, its ticks and label

    @property
    def width(self) -> float:
        return max(7.5, self.left + self.cell * self.columns + self.right)

    @property
    def panel_height(self) -> float:
        return self.row_height * self.rows

    @property
    def height(self) -> float:
        return self.title + self.panels * (self.panel_height + self.labels) + self.bar_space + 0.15

    def panel_box(self, panel: int) -> list[float]:
        top = self.title + panel * (self.panel_height + self.labels)
        bottom = self.height - top - self.panel_height
        return [self.left / self.width, bottom / self.height, self.cell * self.columns / self.width,
                self.panel_height / self.height]

    def colourbar_box(self) -> list[float]:
        length = min(6.0, self.width - 1.0)
        bottom = self.height - self.title - self.panels * (self.panel_height + self.labels) - self.bar_height
        return [(self.width - length) / 2 / self.width, bottom / self.height,
                length / self.width, self.bar_height / self.height]


def _short(label: str, limit: int = 14) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _plot_title(attr: Attribution, width: float) -> str:
    import textwrap

    title = f"{METHOD_NAMES.get(attr.method, attr.method)} attribution"
    if attr.target:
        title += f" of the {attr.target}"
    if attr.prediction is not None:
        title += f"; the model predicts {attr.prediction!r}"
    return "\n".join(textwrap.wrap(title, width=max(40, int(width * 11)), max_lines=2, placeholder=" …"))
