"""The shipped default model: files, tokenizer, fact accuracy, attention backends, GIM attribution."""

from __future__ import annotations

import pytest
import torch

import fastgim
from fastgim.data import COUNTRIES, RELATIONS, TEMPLATES, fact_prompts, held_out_prompts, vocabulary_words
from fastgim.data.facts import FactPrompt
from fastgim.default_model import DEFAULT_MODEL_DIR, load_default_model

MAX_WEIGHTS_BYTES = 20 * 10**6
# Measured on the shipped model (1200 steps): train 1.000, held-out 0.933, subject top-2 0.933.
# The targets (held-out >= 0.8, " Paris" after the held-out "The capital of France is")
# need a longer training run; see test_predicts_paris.
MIN_TRAIN_ACCURACY = 0.98
MIN_HELD_OUT_ACCURACY = 0.85
MIN_SUBJECT_TOP2_RATE = 0.85


@pytest.fixture(scope="module")
def default() -> tuple[torch.nn.Module, object]:
    return load_default_model()


def _group_by_length(tok, prompts: list[FactPrompt]) -> dict[int, list[tuple[list[int], FactPrompt]]]:
    groups: dict[int, list[tuple[list[int], FactPrompt]]] = {}
    for p in prompts:
        ids = tok(p.prompt)["input_ids"]
        groups.setdefault(len(ids), []).append((ids, p))
    return groups


def _answer_id(tok, p: FactPrompt) -> int:
    return tok(p.answer, add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def _last_logits(model, tok, prompts: list[FactPrompt]) -> tuple[torch.Tensor, list[FactPrompt]]:
    """Next-token logits (n, vocab) after each prompt, and the prompts in the same order."""
    logits, order = [], []
    for items in _group_by_length(tok, prompts).values():
        ids = torch.tensor([ids for ids, _ in items])
        logits.append(model(input_ids=ids).logits[:, -1].float())
        order += [p for _, p in items]
    return torch.cat(logits), order


def _accuracy(model, tok, prompts: list[FactPrompt]) -> float:
    logits, order = _last_logits(model, tok, prompts)
    answers = torch.tensor([_answer_id(tok, p) for p in order])
    return (logits.argmax(-1) == answers).float().mean().item()


def test_facts_data_is_consistent() -> None:
    held = held_out_prompts()
    assert len(COUNTRIES) >= 100
    assert len(held) == len(COUNTRIES)  # exactly one held-out prompt per country
    assert sorted(p.subject for p in held) == sorted(c.name for c in COUNTRIES)
    assert {p.relation for p in held} == set(RELATIONS)
    train_sentences = {p.sentence for p in fact_prompts("train")}
    assert not train_sentences & {p.sentence for p in held}
    # every held-out fact is still trained through the relation's other templates
    for p in held:
        others = [q for q in fact_prompts("train") if q.subject == p.subject and q.relation == p.relation]
        assert len(others) == len(TEMPLATES[p.relation]) - 1
        assert all(q.answer == p.answer for q in others)
    assert fact_prompts("heldout")[0].sentence == "The capital of France is Paris."
    with pytest.raises(ValueError, match="unknown split"):
        fact_prompts("test")  # type: ignore[arg-type]


def test_files_and_architecture(default) -> None:
    model, _ = default
    size = (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size
    assert 0 < size <= MAX_WEIGHTS_BYTES
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.tie_word_embeddings
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert not model.training
    assert model.config._attn_implementation == "gim_fused"


def test_tokenizer(default) -> None:
    _, tok = default
    for word in vocabulary_words():
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for country in COUNTRIES:
        assert len(tok(country.name, add_special_tokens=False)["input_ids"]) == 1, country.name
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids)[-2:] == ["ĠFrance", "Ġis"]
    sentence = "France's capital city is Paris. Python has a def statement."
    assert tok.decode(tok(sentence, add_special_tokens=False)["input_ids"]) == sentence
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert len(tok(" ", add_special_tokens=False)["input_ids"]) == 1  # explain's baseline token


def test_predicts_trained_facts(default) -> None:
    model, tok = default
    assert _accuracy(model, tok, fact_prompts("train")) >= MIN_TRAIN_ACCURACY


def test_predicts_held_out_facts(default) -> None:
    model, tok = default
    assert _accuracy(model, tok, held_out_prompts()) >= MIN_HELD_OUT_ACCURACY


def test_predicts_paris(default) -> None:
    model, tok = default
    france = fact_prompts("heldout")[0]
    logits, _ = _last_logits(model, tok, [france])
    assert tok.decode(logits.argmax(-1)) == " Paris"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_implementations_agree(default, attn_implementation: str) -> None:
    model, tok = default
    other, _ = load_default_model(attn_implementation=attn_implementation)
    prompts = held_out_prompts()[::3]
    expected, _ = _last_logits(model, tok, prompts)
    got, _ = _last_logits(other, tok, prompts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load(default, dtype: torch.dtype) -> None:
    model, tok = default
    low, _ = load_default_model(dtype=dtype)
    assert all(p.dtype == dtype for p in low.parameters())
    prompts = held_out_prompts()
    ref, _ = _last_logits(model, tok, prompts)
    got, _ = _last_logits(low, tok, prompts)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_reload_is_deterministic(default) -> None:
    model, tok = default
    again, tok2 = load_default_model()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    prompts = held_out_prompts()[:20]
    first, _ = _last_logits(model, tok, prompts)
    second, _ = _last_logits(again, tok2, prompts)
    assert torch.equal(first, second)


def test_loader_rejects_bad_dtype() -> None:
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_default_model(dtype=torch.int64)


def test_gim_attribution_ranks_subject_top2(default) -> None:
    model, tok = default
    hits, total = 0, 0
    for items in _group_by_length(tok, held_out_prompts()).values():
        ids = torch.tensor([ids for ids, _ in items])
        targets = [_answer_id(tok, p) for _, p in items]
        scores = fastgim.explain(model, ids, target_token_id=targets, tokenizer=tok)
        scores = scores.reshape(ids.shape)
        assert torch.isfinite(scores).all()
        subject_ids = torch.tensor([tok(" " + p.subject if " " + p.subject in p.prompt else p.subject,
                                        add_special_tokens=False)["input_ids"][0] for _, p in items])
        assert (ids[:, 0] == tok.bos_token_id).all()
        top2 = scores[:, 1:].topk(2, dim=-1).indices + 1  # rank the prompt's tokens, not <s>
        hits += (ids.gather(1, top2) == subject_ids[:, None]).any(-1).sum().item()
        total += len(items)
    assert hits / total >= MIN_SUBJECT_TOP2_RATE
