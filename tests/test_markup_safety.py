"""No markup injection: HTML escapes every field, rich never parses token text as markup, load stays in its folder."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from fastgim.results import Attribution

HOSTILE = '<img src=x onerror="alert(1)">'


def _attribution(**overrides) -> Attribution:
    fields = dict(
        tokens=["<s>", HOSTILE, "[bold red]"], pieces=["<s>", f" {HOSTILE}", " The capital [/] of [bold red]France"],
        token_ids=[1, 2, 3], scores=torch.tensor([0.1, -0.5, 0.25]), method=HOSTILE, target=HOSTILE,
        prediction=HOSTILE, target_value=1.0, target_tokens=[HOSTILE, "[/]"],
        target_scores=torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]), settings={"x": HOSTILE},
    )
    return Attribution(**{**fields, **overrides})


@pytest.mark.parametrize("level", ["token", "word", "sentence"])
def test_html_escapes_every_field(level):
    attribution = _attribution()
    attribution = {"token": attribution, "word": attribution.to_words(), "sentence": attribution.to_sentences()}[level]
    page = attribution.to_html(title=HOSTILE)
    assert "<img" not in page and "onerror=\"" not in page
    assert "&lt;img src=x onerror=" in page


def test_a_loaded_result_with_a_hostile_level_is_refused(tmp_path):
    json_path, _ = _attribution().save(tmp_path / "saved")
    meta = json.loads(json_path.read_text())
    meta["level"] = HOSTILE
    json_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="level must be one of token, word, sentence"):
        Attribution.load(json_path)


@pytest.mark.parametrize("level", ["token", "word", "sentence"])
def test_show_prints_token_text_literally(level):
    attribution = _attribution()
    attribution = {"token": attribution, "word": attribution.to_words(), "sentence": attribution.to_sentences()}[level]
    console = Console(file=io.StringIO(), width=200, color_system=None, record=True)
    attribution.show(console)  # "[/]" raised rich's MarkupError before
    text = console.export_text()
    assert "[/]" in text and "[bold red]" in text


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "sub/saved.safetensors", "", None, 3])
def test_load_reads_tensors_only_from_the_json_folder(tmp_path, name):
    folder = tmp_path / "folder"
    json_path, tensor_path = _attribution().save(folder / "saved")
    (tmp_path / "outside.safetensors").write_bytes(tensor_path.read_bytes())
    (folder / "sub").mkdir()
    (folder / "sub" / "saved.safetensors").write_bytes(tensor_path.read_bytes())
    meta = json.loads(json_path.read_text())
    meta["tensors"] = name
    json_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="must be a file name in the same folder"):
        Attribution.load(json_path)


def test_save_load_round_trip_still_exact(tmp_path):
    attribution = _attribution()
    attribution.save(tmp_path / "saved")
    assert Attribution.load(tmp_path / "saved").equals(attribution)


def test_cli_explain_at_word_level_prints_markup_literally(capsys):
    from fastgim.cli import main

    assert main(["explain", "--text", "The capital [/] of [bold red]France is", "--level", "word"]) == 0
    out = capsys.readouterr().out
    assert "' [/]'" in out and "[bold" in out
