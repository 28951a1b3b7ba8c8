"""Progress bars, the PNG heatmap's colour bar and title, decoded HTML tooltips, truncated show()."""

from __future__ import annotations

import html
import io
import re
import sys

import pytest
import torch
from test_attribution import TEXT, tiny_llama, tiny_tokenizer
from test_html_render import make

import fastgim.progress
from fastgim.attribution import attribute
from fastgim.results import Attribution, heatmap_figure, shown_rows


class _Terminal(io.StringIO):
    """A stderr that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=3)


# ---------------------------------------------------------------------------- progress
@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion"])
def test_no_progress_output_when_stderr_is_not_a_terminal(llama, capsys, monkeypatch, method):
    monkeypatch.setattr(fastgim.progress, "DELAY_S", 0.0)  # even a long run stays silent off a terminal
    attribute(llama, TEXT, tokenizer=tiny_tokenizer(), method=method, n_steps=6, internal_batch_size=2)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out and captured.err == ""


@pytest.mark.parametrize(("method", "desc"), [("integrated_gradients", "integrated gradients steps"),
                                              ("occlusion", "occluded inputs")])
def test_progress_bar_on_a_terminal(llama, monkeypatch, method, desc):
    monkeypatch.setattr(fastgim.progress, "DELAY_S", 0.0)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    attribute(llama, TEXT, tokenizer=tiny_tokenizer(), method=method, n_steps=6, internal_batch_size=2)
    shown = terminal.getvalue()
    total = 6 if method == "integrated_gradients" else len(tiny_tokenizer()(TEXT).input_ids)
    assert f"{desc}:   0%" in shown and f"0/{total} " in shown
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    attribute(llama, TEXT, tokenizer=tiny_tokenizer(), method=method, n_steps=6, internal_batch_size=2,
              progress=False)
    assert quiet.getvalue() == ""


def test_progress_bar_waits_for_a_long_run(llama, monkeypatch):
    monkeypatch.setattr(fastgim.progress, "DELAY_S", 60.0)  # a fast run ends before the bar would appear
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    attribute(llama, TEXT, tokenizer=tiny_tokenizer(), method="integrated_gradients", n_steps=4)
    assert terminal.getvalue() == ""


def test_a_jupyter_kernel_counts_as_interactive(monkeypatch):
    import types

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # ipykernel's stderr is no terminal
    assert not fastgim.progress.interactive()
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert fastgim.progress.interactive()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))  # plain IPython
    assert not fastgim.progress.interactive()


def test_progress_does_not_change_scores(llama, monkeypatch):
    monkeypatch.setattr(fastgim.progress, "DELAY_S", 0.0)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    kwargs = dict(tokenizer=tiny_tokenizer(), method="integrated_gradients", n_steps=5, internal_batch_size=2)
    shown = attribute(llama, TEXT, progress=True, **kwargs).scores
    assert torch.equal(shown, attribute(llama, TEXT, progress=False, **kwargs).scores)


# ---------------------------------------------------------------------------- PNG
@pytest.mark.parametrize("n", [3, 61, 421])
def test_colour_bar_ticks_span_the_data_and_stay_readable(tmp_path, n):
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(n, generator=gen) * 2
    scores[n // 2] = -7.33  # the case: ticks used to stop at +-5
    fig = heatmap_figure(make(scores.tolist()))
    bar = fig.axes[-1]
    ticks = bar.get_xticks()
    assert ticks.min() == pytest.approx(-7.33, rel=1e-6) and ticks.max() == pytest.approx(7.33, rel=1e-6)
    assert bar.get_xlim() == pytest.approx((-7.33, 7.33), rel=1e-6)  # the bar spans exactly the scale
    width_in = bar.get_position().width * fig.get_figwidth()
    height_in = bar.get_position().height * fig.get_figheight()
    assert 4.0 <= width_in <= 6.01 and height_in >= 0.15
    labels = [t.get_text() for t in bar.get_xticklabels()]
    assert labels[0] == "-7.33" and labels[-1] == "+7.33"
    panels = fig.axes[:-1]
    assert len(panels) == -(-n // 60)  # long inputs wrap into panels of 60 tokens
    assert sum(len(ax.get_xticks()) for ax in panels) == n
    import matplotlib.pyplot as plt

    plt.close(fig)
    from PIL import Image

    path = make(scores.tolist()).plot(tmp_path / "h.png", dpi=100)
    with Image.open(path) as image:
        width, height = image.size
    assert width <= 100 * (1.6 + 0.42 * 60 + 0.4) + 1  # never wider than one 60-token panel
    assert height == pytest.approx(100 * (0.75 + len(panels) * 1.42 + 0.95), abs=2)


def test_plot_title_is_readable():
    attr = make([1.0, -2.0, 0.5])
    attr.method, attr.target = "integrated_gradients", "logit of ' Paris' (id 7) at position 2"
    fig = heatmap_figure(attr)
    title = fig._suptitle.get_text()
    assert title.startswith("Integrated gradients attribution of the logit of ' Paris'")
    assert "the model predicts ' x'" in title
    import matplotlib.pyplot as plt

    plt.close(fig)
    with pytest.raises(ValueError, match="tokens_per_row"):
        heatmap_figure(attr, tokens_per_row=0)


# ---------------------------------------------------------------------------- HTML
def _titles(page: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r'<span class="tok[^"]*"[^>]* title="([^"]*)"', page)]


def test_tooltips_show_decoded_text_not_tokenizer_pieces():
    attr = Attribution(tokens=["<s>", "ĠThe", "Ġcapital", "Ċ"], pieces=["<s>", " The", " capital", "\n"],
                       token_ids=[0, 1, 2, 3], scores=torch.tensor([0.0, 0.5, -1.25, 2.0]), method="gim")
    titles = _titles(attr.to_html())
    assert titles == ["#0 '<s>': +0", "#1 ' The': +0.5", "#2 ' capital': -1.25", "#3 '\\n': +2"]
    assert not any("Ġ" in t or "Ċ" in t for t in titles)


def test_tooltips_of_the_bundled_byte_level_tokenizer():
    import fastgim

    model, tokenizer = fastgim.load_default_model()
    result = attribute(model, "The capital of France is", tokenizer=tokenizer, method="gradient_x_input")
    titles = _titles(result.to_html())
    assert len(titles) == len(result) and any(" capital'" in t for t in titles)
    assert all(re.fullmatch(r"#\d+ '.*': [+-].*", t) for t in titles)
    assert not any(token in "".join(titles) for token in result.tokens if token != token.replace("Ġ", " "))


# ---------------------------------------------------------------------------- show()
def _shown(attr: Attribution, **kwargs) -> str:
    from rich.console import Console

    console = Console(record=True, width=120, file=io.StringIO())
    attr.show(console, **kwargs)
    return console.export_text()


def _table_rows(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^│\s*(\d+)\s*│", text, flags=re.M)]


def test_show_lists_the_top_k_of_a_long_input():
    scores = torch.sin(torch.arange(700, dtype=torch.float32) * 0.37) * torch.linspace(0.1, 1.0, 700)
    attr = make(scores.tolist())
    text = _shown(attr)
    rows = _table_rows(text)
    want = sorted(range(700), key=lambda i: -abs(float(scores[i])))[:20]
    assert rows == want and "top 20 of 700 tokens by |score|" in " ".join(text.split())  # a wrapped title
    assert _table_rows(_shown(attr, top_k=5)) == want[:5]
    assert _table_rows(_shown(attr, top_k=None)) == list(range(700))
    assert _table_rows(_shown(make([0.1, -0.3, 0.2]))) == [0, 1, 2]  # short inputs: in order, complete


def test_show_window():
    attr = make([float(i % 7) - 3 for i in range(300)])
    text = _shown(attr, window=(100, 110), top_k=None)
    assert _table_rows(text) == list(range(100, 110))
    assert "[... 100 before]" in text and "[... 190 after]" in text
    assert " w100 w101" in text and " w99 " not in text and " w110" not in text
    assert _table_rows(_shown(attr, window=(-3, None))) == [297, 298, 299]
    assert shown_rows(attr, window=(280, None), top_k=4)[1] == [280, 286, 287, 293]
    with pytest.raises(ValueError, match="selects no token"):
        attr.show(window=(400, 500))
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        attr.show(top_k=-1)
