"""CLI help texts (every default shown, every option explained, no RST), CHG CLI defaults and output,
and LensAPI keeping the model's training flag."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from test_chg import ANSWERS, PROMPTS, make_model, make_tokenizer

from fastgim.cli import build_parser, main

MEASURED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "chg_cli_defaults.json"
RST = re.compile(r"``|:(func|class|meth|mod|data|attr):`")


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("command", ["chg", "evaluate"])
def test_help_explains_every_option_and_shows_every_default(command, capsys):
    parser = _subparser(command)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert not RST.search(text), RST.search(text)
    flat = " ".join(text.split())
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help and len(action.help) > 15, action.option_strings
        if action.default not in (None, False):
            assert f"(default: {action.default})" in flat, action.option_strings
        elif not action.required and action.default is None:
            assert "default" in action.help, action.option_strings  # says what happens without it


def test_chg_defaults_are_the_measured_quick_ones():
    from fastgim.commands import chg

    args = _subparser("chg").parse_args(["--data", "x.jsonl", "--out", "o"])
    assert (args.num_masks, args.num_updates, args.num_reg_updates, args.batch_size) == (
        chg.DEFAULT_NUM_MASKS, chg.DEFAULT_NUM_UPDATES, chg.DEFAULT_NUM_REG_UPDATES, chg.DEFAULT_BATCH_SIZE)
    name = f"{args.num_masks}x{args.num_updates}+{args.num_reg_updates}x{args.batch_size}"
    measured = json.loads(MEASURED.read_text())["configs"][name]  # benchmarks/chg_cli_defaults.py
    assert measured["num_masks"] == args.num_masks and measured["num_updates"] == args.num_updates
    assert max(measured["cpu_seconds"]) < 120  # about a minute of one CPU thread: "a few minutes" with load
    assert min(measured["retained_gap"]) > 0.95  # the facilitating heads found carry the task
    assert measured["seed_agreement"] >= 0.65 and measured["confident_seed_agreement"][0] == 1.0
    assert min(measured["reference_agreement"]) >= 0.8  # vs twice the updates, same seed
    description = _subparser("chg").description
    assert "benchmarks/results/chg_cli_defaults.json" in description


def test_evaluate_help_states_the_paper_protocol(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "GIM paper" in text and "cumulatively" in text and "(default: 50)" in text
    assert "N = |f|, the full logit" in text and "f + m*ln(V)" in text


def test_chg_cli_prints_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    model_dir = tmp_path / "model"
    make_model().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"text": p, "target": a}) for p, a in zip(PROMPTS, ANSWERS)))
    capsys.readouterr()
    code = main(["chg", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "res"),
                 "--num-masks", "2", "--num-updates", "2", "--num-reg-updates", "2", "--batch-size", "2",
                 "--device", "cpu"])  # no --quiet
    captured = capsys.readouterr()
    # no CHG bar ("CHG none: ...\r...") in a log; transformers' own loading bar is not ours to test here
    assert code == 0 and "CHG" not in captured.err
    assert json.loads(captured.out)["num_masks"] == 2


@pytest.mark.parametrize("training", [True, False])
def test_lens_api_keeps_the_models_training_flag(training):
    from fastgim.lens import LensAPI

    model = make_model().train(training)
    lens = LensAPI(model, make_tokenizer())
    assert model.training is training
    seen = []
    lens.fit(texts=PROMPTS[:2], targets=ANSWERS[:2], num_masks=1, num_updates=1, num_reg_updates=1, batch_size=2,
             verbose=False, callback=lambda mask, metrics: seen.append(model.training))
    assert seen and not any(seen)  # fitted in eval mode (no dropout) ...
    assert model.training is training and all(m.training is training for m in model.modules())  # ... restored
    ids = torch.tensor([lens.tokenizer(PROMPTS[0])["input_ids"]])
    lens.score(input_ids=ids)
    lens.trace(input_ids=ids, layers=[0], sites=["logits"])
    assert model.training is training
    with pytest.raises(ValueError):
        lens.fit(texts=PROMPTS[:2], targets=[" paris"], verbose=False)
    assert model.training is training


def test_explain_top_k_and_window(tmp_path, capsys):
    from test_attribution import tiny_llama, tiny_tokenizer

    tiny_llama(seed=5).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    text = "the cat sat on the mat . a big red dog ran away"
    capsys.readouterr()
    assert main(["explain", "--model", str(tmp_path), "--text", text, "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^│\s*\d+\s*│", out, flags=re.M)) == 3 and "top 3 of" in out
    assert main(["explain", "--model", str(tmp_path), "--text", text, "--top-k", "0", "--window=-4:"]) == 0
    out = capsys.readouterr().out
    assert [int(i) for i in re.findall(r"^│\s*(\d+)\s*│", out, flags=re.M)] == [9, 10, 11, 12]
    assert "[... 9 before]" in out
    with pytest.raises(SystemExit):
        main(["explain", "--model", str(tmp_path), "--text", text, "--window", "4"])
    assert "expected START:END" in capsys.readouterr().err
    assert main(["explain", "--model", str(tmp_path), "--text", text, "--window", "50:60"]) == 2
    assert "selects no token" in capsys.readouterr().err
