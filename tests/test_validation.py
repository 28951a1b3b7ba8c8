"""One input-validation layer (fastgim.validation): every entry point refuses bad input with the same message,
before any compute; non-finite settings, gates and attributions are errors."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import fastgim
from fastgim.attribution import attribute
from fastgim.chg import CHG, CHGDataset, CHGTrainer
from fastgim.evaluation import evaluate
from fastgim.explain import explain
from fastgim.integrations.hf import head_gates
from fastgim.lens import LensAPI
from fastgim.settings import GIMSettings

WORDS = "the a of is capital France Paris Spain Madrid city".split()
VOCAB = 3 + len(WORDS)


@pytest.fixture(scope="module")
def lm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    vocab = {"<pad>": 0, "<unk>": 1, " ": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    return LlamaForCausalLM(config).eval(), tokenizer


def _explain(model, tokenizer, ids, mask):
    return explain(model, ids, attention_mask=mask, baseline_token_id=0)


def _attribute(model, tokenizer, ids, mask):
    return attribute(model, ids, attention_mask=mask, baseline_token_id=0)


def _evaluate(model, tokenizer, ids, mask):
    return evaluate(model, [{"input_ids": ids}], baseline_token_id=0, progress=False, methods=["gim"])


def _chg(model, tokenizer, ids, mask):
    return CHG(model).forward(torch.as_tensor(ids) if isinstance(ids, list) else ids, attention_mask=mask)


def _score(model, tokenizer, ids, mask):
    return LensAPI(model, tokenizer).score(input_ids=ids if isinstance(ids, torch.Tensor) else torch.tensor(ids),
                                           attention_mask=mask)


ENTRY_POINTS = {"explain": _explain, "attribute": _attribute, "evaluate": _evaluate, "CHG": _chg,
                "LensAPI.score": _score}
BAD_IDS = [
    ([[1, 4, 500]], ValueError, r"token id 500 outside the model's vocabulary \[0, 13\)"),
    ([[1, -2, 4]], ValueError, r"token id -2 outside the model's vocabulary \[0, 13\)"),
    ([[1.0, 12.7, 3.0]], TypeError, "must hold integer token ids, got dtype torch.float32"),
]
BAD_MASKS = [
    ([[0, 0, 0]], ValueError, "row 0 has no real token"),
    ([[1, 2, 1]], ValueError, "only 0 .padding. and 1"),
]


@pytest.mark.parametrize(("ids", "error", "message"), BAD_IDS)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_token_ids_get_the_same_error_everywhere(lm, entry, ids, error, message):
    model, tokenizer = lm
    values = ids if entry == "evaluate" else torch.tensor(ids)
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](model, tokenizer, values, None)


@pytest.mark.parametrize(("mask", "error", "message"), BAD_MASKS)
@pytest.mark.parametrize("entry", ["explain", "attribute", "CHG", "LensAPI.score"])
def test_bad_attention_masks_get_the_same_error_everywhere(lm, entry, mask, error, message):
    model, tokenizer = lm
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](model, tokenizer, torch.tensor([[3, 4, 5]]), torch.tensor(mask))


@pytest.mark.parametrize("entry", ["explain", "attribute", "evaluate"])
def test_empty_input_says_empty(lm, entry):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="is empty"):
        ENTRY_POINTS[entry](model, tokenizer, [], None)


@pytest.mark.parametrize("entry", ["explain", "attribute", "evaluate"])
def test_text_without_a_tokenizer_asks_for_one(lm, entry):
    model, _ = lm
    call = {"explain": lambda: explain(model, "the capital of France is", baseline_token_id=0),
            "attribute": lambda: attribute(model, "the capital of France is", baseline_token_id=0),
            "evaluate": lambda: evaluate(model, ["the capital of France is"], baseline_token_id=0, progress=False)}
    with pytest.raises(ValueError, match="text inputs.* need a tokenizer: pass tokenizer="):
        call[entry]()


def test_explain_tokenizes_text_with_the_tokenizer(lm):
    model, tokenizer = lm
    text = "the capital of France is"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(explain(model, text, tokenizer=tokenizer), explain(model, ids, tokenizer=tokenizer),
                               rtol=0, atol=0)


@pytest.mark.parametrize("entry", ["explain", "attribute", "evaluate"])
@pytest.mark.parametrize("baseline", [1.9, True, "3"])
def test_a_non_integer_baseline_is_refused(lm, entry, baseline):
    model, _ = lm
    call = {"explain": lambda: explain(model, [[3, 4, 5]], baseline_token_id=baseline),
            "attribute": lambda: attribute(model, [3, 4, 5], baseline_token_id=baseline),
            "evaluate": lambda: evaluate(model, [[3, 4, 5, 6]], baseline_token_id=baseline, progress=False)}
    with pytest.raises(TypeError, match="baseline_token_id must be an integer token id"):
        call[entry]()


@pytest.mark.parametrize("entry", ["explain", "attribute"])
@pytest.mark.parametrize(("position", "error", "message"), [
    (2.5, TypeError, "target_position must be an integer position, got 2.5"),
    (7, ValueError, r"target_position 7 is out of range, outside the input of 3 (real )?tokens"),
])
def test_target_positions_are_integers_in_range(lm, entry, position, error, message):
    model, _ = lm
    call = {"explain": lambda: explain(model, [3, 4, 5], baseline_token_id=0, target_position=position),
            "attribute": lambda: attribute(model, [3, 4, 5], baseline_token_id=0, target_position=position)}
    with pytest.raises(error, match=message):
        call[entry]()


# --------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("name", ["softmax_temperature", "q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_settings_are_refused_when_constructed(lm, name, value):
    model, _ = lm
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        GIMSettings(**{name: value})
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        fastgim.GIM(model, **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        explain(model, [3, 4, 5], baseline_token_id=0, **{name: value})


@pytest.mark.parametrize("value", [5.0, -0.5, math.nan])
def test_gates_outside_zero_one_are_refused(lm, value):
    model, _ = lm
    gates = torch.full((2, 2), 0.5)
    gates[1, 0] = value
    with pytest.raises(ValueError, match=r"head gates must be in \[0, 1\]"), head_gates(gates):
        pass
    with pytest.raises(ValueError, match=r"head gates must be in \[0, 1\]"):
        explain(model, [3, 4, 5], baseline_token_id=0, head_mask=gates)
    with pytest.raises(ValueError, match=r"head gates must be in \[0, 1\]"):
        CHG(model).forward(torch.tensor([[3, 4, 5]]), gates)


@pytest.mark.parametrize(("name", "value"), [("l1_weight", math.nan), ("lr", math.nan), ("lr", math.inf),
                                             ("lr_reg", math.nan), ("l1_weight", -1.0), ("grad_norm", math.nan)])
def test_chg_trainer_refuses_non_finite_hyperparameters(lm, name, value):
    model, _ = lm
    dataset = CHGDataset.from_tokens(torch.tensor([[3, 4, 5, 6]]), torch.tensor([[0, 0, 1, 1]]).bool(), 0)
    with pytest.raises(ValueError, match=f"{name} must be"):
        CHGTrainer(model, dataset, **{name: value})


def test_chg_trainer_refuses_ids_outside_the_vocabulary(lm):
    model, _ = lm
    dataset = CHGDataset.from_tokens(torch.tensor([[3, 4, 50, 6]]), torch.tensor([[0, 0, 1, 1]]).bool(), 0)
    with pytest.raises(ValueError, match="token id 50 outside the model's vocabulary"):
        CHGTrainer(model, dataset)


def test_nan_weights_give_an_error_naming_the_parameter():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.nan
    for call in (lambda: explain(model, [3, 4, 5], baseline_token_id=0, target_token_id=4),
                 lambda: attribute(model, [3, 4, 5], baseline_token_id=0, target=4)):
        with pytest.raises(FloatingPointError, match=r"non-finite.*'model.layers.1.mlp.up_proj.weight'"):
            call()
    assert [p.requires_grad for p in model.parameters()] == flags
