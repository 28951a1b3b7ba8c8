"""The ``fastgim explain`` and ``fastgim evaluate`` sub-commands."""

from __future__ import annotations

import json

import pytest
import torch
from test_attribution import tiny_llama, tiny_tokenizer

from fastgim.attribution import attribute
from fastgim.cli import main
from fastgim.results import Attribution


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=11).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_explain_writes_html_png_json(model_dir, tmp_path, capsys):
    html, png, js = tmp_path / "a.html", tmp_path / "out" / "a.png", tmp_path / "a.json"
    text = "the cat sat on the mat"
    rc = main(["explain", "--text", text, "--model", str(model_dir), "--method", "gim",
               "--html", str(html), "--png", str(png), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "prediction:" in out and "method: gim" in out and "' mat'" in out
    saved = Attribution.from_dict(json.loads(js.read_text()))
    model, tok = tiny_llama(seed=11), tiny_tokenizer()
    want = attribute(model, text, tokenizer=tok, method="gim")
    assert torch.equal(saved.scores, want.scores) and saved.tokens == want.tokens
    assert html.read_text().count('<span class="tok') == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra",
    [["--target", " on the mat", "--level", "word"], ["--generate", "2", "--method", "occlusion"],
     ["--target-id", "5", "--contrast", "dog", "--method", "integrated_gradients", "--n-steps", "3"],
     ["--level", "sentence", "--method", "saliency"]],
)
def test_explain_targets_and_levels(model_dir, tmp_path, capsys, extra):
    js = tmp_path / "a.json"
    rc = main(["explain", "--text", "the cat sat . a dog", "--model", str(model_dir), "--json", str(js), *extra])
    assert rc == 0
    saved = json.loads(js.read_text())
    if "--target" in extra:
        assert saved["level"] == "word" and saved["target_tokens"] == ["on", "the", "mat"]
    if "--generate" in extra:
        assert len(saved["target_tokens"]) == 2
    if "--level" in extra and "sentence" in extra:
        assert saved["level"] == "sentence" and len(saved["pieces"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--text", "  "], "--text is empty"),
        (["--text", "the cat", "--target", " "], "tokenizes to no tokens"),
        (["--text", "the cat", "--target", "x", "--target-id", "3"], "not both"),
        (["--text", "the cat", "--method", "integrated_gradients", "--n-steps", "0"], "n_steps must be >= 1"),
    ],
)
def test_explain_bad_inputs(model_dir, capsys, argv, message):
    assert main(["explain", "--model", str(model_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_explain_unknown_method_and_missing_model(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--text", "the cat", "--model", str(model_dir), "--method", "shap"])
    assert "invalid choice: 'shap'" in capsys.readouterr().err
    assert main(["explain", "--text", "the cat", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_jsonl(model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    model, tok = tiny_llama(seed=11), tiny_tokenizer()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok("a big red dog ran").input_ids])).logits[0, -1]
    likely = " " + tok.decode([int(logits[4:].argmax()) + 4])  # above chance level: evaluated
    lines = [{"text": "the cat sat on the mat"}, {}, {"text": "a big red dog ran", "target": likely},
             {"text": "the big dog sat"}]
    data.write_text("\n".join("" if not x else json.dumps(x) for x in lines) + "\n")
    out_json = tmp_path / "res.json"
    rc = main(["evaluate", "--model", str(model_dir), "--data", str(data), "--methods", "gim,random",
               "--max-k", "3", "--json", str(out_json), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("| gim |") == 2 and out.count("| random |") == 2  # one table per target kind
    assert "## logit targets (2 examples)" in out and "## log-prob targets (1 examples)" in out
    summary = json.loads(out_json.read_text())
    assert set(summary) == {"logit", "log-prob"} and set(summary["logit"]) == {"gim", "random"}
    assert summary["logit"]["gim"]["n"] == 2 and summary["log-prob"]["gim"]["n"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [("{\"text\": \"the cat sat\"}\nnot json\n", "data.jsonl:2: not valid JSON"),
     ("[1, 2]\n", "data.jsonl:1: each line must be an object"), ("\n", "has no examples")],
)
def test_evaluate_bad_data(model_dir, tmp_path, capsys, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_unknown_method(model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on"}) + "\n")
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--methods", "gim,shap"]) == 2
    assert "shap" in capsys.readouterr().err


def test_default_model_from_the_command_line(tmp_path, capsys):
    html = tmp_path / "page.html"
    assert main(["explain", "--text", "The capital of France is", "--html", str(html)]) == 0  # no --model
    out = capsys.readouterr().out
    assert "prediction:" in out and " France" in out
    assert html.read_text().count('<span class="tok') == 6
