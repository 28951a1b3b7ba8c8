"""Attribution.to_html(): page structure, colours, escaping, and a headless Chromium screenshot."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgim.results import Attribution, colour

ROOT = Path(__file__).resolve().parents[1]


def make(scores, pieces=None, target_scores=None) -> Attribution:
    n = len(scores)
    pieces = pieces or [f" w{i}" for i in range(n)]
    return Attribution(
        tokens=[p.strip() or "_" for p in pieces], pieces=pieces, token_ids=list(range(n)),
        scores=torch.tensor(scores, dtype=torch.float32), method="gim", target="logit of ' x'", prediction=" x",
        target_tokens=[] if target_scores is None else [f"t{i}" for i in range(len(target_scores))],
        target_scores=None if target_scores is None else torch.tensor(target_scores, dtype=torch.float32),
    )


class _Spans(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, str]] = []
        self.external: list[str] = []
        self._open: dict[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "tok" in attrs.get("class", ""):
            self._open = {**attrs, "text": ""}
            self.spans.append(self._open)
        for key in ("src", "href"):
            if key in attrs:
                self.external.append(attrs[key])

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._open = None


def _rgb(style: str) -> tuple[int, int, int]:
    inside = style.split("rgb(")[1].split(")")[0]
    return tuple(int(v) for v in inside.split(","))  # type: ignore[return-value]


@pytest.mark.parametrize("n", [1, 5, 97])
def test_page_has_one_coloured_span_per_token_with_hover_values(n):
    gen = torch.Generator().manual_seed(n)
    scores = (torch.rand(n, generator=gen) * 2 - 1).tolist()
    page = make(scores).to_html()
    parser = _Spans()
    parser.feed(page)
    assert len(parser.spans) == n and not parser.external  # self-contained
    scale = max(abs(s) for s in scores)
    for span, value in zip(parser.spans, scores):
        assert f"{value:+.6g}" in span["title"] and span["title"] == span["data-score"]
        assert _rgb(span["style"]) == colour(value, scale)
    strongest = int(np.argmax(np.abs(scores)))
    r, g, b = _rgb(parser.spans[strongest]["style"])
    assert (r > b) == (scores[strongest] > 0) and min(r, g, b) < 60


def test_colour_scale_is_diverging():
    assert colour(0.0, 1.0) == (255, 255, 255)
    red, blue = colour(1.0, 1.0), colour(-1.0, 1.0)
    assert red[0] > 150 and red[2] < 60 and blue[2] > 150 and blue[0] < 60
    assert colour(5.0, 1.0) == red and colour(float("nan"), 1.0) == (255, 255, 255)
    light = colour(0.3, 1.0)
    assert light[0] > red[0] and light[2] > red[2]  # paler for smaller values


def test_html_escapes_token_text_and_shows_target_rows():
    attr = make([0.5, -0.5], pieces=["<script>alert(1)</script>", ' "&"\n'], target_scores=[[1.0, 0.0], [0.0, -1.0]])
    page = attr.to_html(title="a <b> title")
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "a &lt;b&gt; title" in page
    assert "Per target token" in page and page.count('class="tokens"') == 3


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], check=False, timeout=900)
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_page_renders_in_headless_chromium_with_colours(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed and scripts/install_chromium.sh could not install it "
                    "(needs root and apt-get: apt-get install chromium chromium-driver)")
    import matplotlib.image

    page = tmp_path / "attribution.html"
    page.write_text(make([1.0, -1.0, 0.6, -0.6, 0.0, 0.9]).to_html(), encoding="utf-8")
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=900,500",
           f"--screenshot={shot}", page.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(str(shot))[..., :3]
    if pixels.dtype != np.uint8:
        pixels = (pixels * 255).round().astype(np.int32)
    r, g, b = (pixels[..., i].astype(np.int32) for i in range(3))
    red = (r > 150) & (b < 80) & (g < 80)
    blue = (b > 140) & (r < 80)
    assert red.sum() > 200 and blue.sum() > 200, (red.sum(), blue.sum())


def test_show_prints_prediction_and_every_token():
    from rich.console import Console

    console = Console(record=True, width=100, color_system="truecolor", force_terminal=True)
    make([1.0, -0.5, 0.25], pieces=["the", " cat", " sat"]).show(console)
    text = console.export_text(clear=False)
    assert "prediction: ' x'" in text and "the cat sat" in text and "+0.25" in text and "-0.5" in text
    ansi = console.export_text(styles=True)
    assert "48;2;178;24;43" in ansi and "48;2;33;102;172" not in ansi  # full red background, no full blue


def test_plot_writes_a_coloured_heatmap(tmp_path):
    import matplotlib.image

    path = make([1.0, -1.0, 0.5], target_scores=[[1.0, 0.0, 0.0], [0.0, -1.0, 0.5]]).plot(tmp_path / "h.png")
    pixels = matplotlib.image.imread(str(path))[..., :3]
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    red = (r > g + 0.25) & (r > b + 0.2)
    blue = (b > r + 0.25) & (b > g + 0.1)
    assert red.sum() > 500 and blue.sum() > 500
