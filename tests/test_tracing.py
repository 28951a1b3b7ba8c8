"""Tests for fastgim.tracing (TransformerTracer.trace / .score) and fastgim.adapters."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import fastgim  # noqa: F401  (registers gim_fused)
from fastgim.adapters import get_adapter
from fastgim.tracing import SITES, TransformerTracer, last_token_index, target_positions

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "then", "slept"]
VOCAB = len(WORDS) + 2


def tiny_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   padding_side=padding_side)


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "attn_implementation": "gim_fused"}
    if family == "llama":  # GQA
        model = LlamaForCausalLM(LlamaConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                             num_attention_heads=6, num_key_value_heads=2,
                                             max_position_embeddings=64, **common))
    elif family == "qwen3":  # q/k norms
        model = Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                             max_position_embeddings=64, **common))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=24, n_layer=2, n_head=4, n_positions=64, **common))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64, **common))
    return model.to(dtype).eval()


FAMILIES = ["llama", "qwen3", "gpt2", "gpt_neox"]
TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.float64: {"atol": 1e-10, "rtol": 1e-9}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [1, 11])
def test_trace_sites_against_references(family: str, dtype: torch.dtype, length: int) -> None:
    model = tiny_model(family, dtype)
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (2, length))
    parallel = get_adapter(model).parallel_residual
    trace = TransformerTracer(model).trace(ids, sites=[s for s in SITES if not (parallel and s == "post_attn_residual")])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hidden = out.hidden_states
    n = adapter.num_layers
    assert set(trace.sites) | ({"post_attn_residual"} if parallel else set()) == set(SITES)
    assert trace.layers == list(range(n))
    torch.testing.assert_close(trace.final_logits, out.logits, **TOL[dtype])
    previous = hidden[0]
    for layer in range(n):
        block = trace.get("block_out", layer)
        assert block.shape == (2, length, adapter.hidden_size)
        if layer < n - 1:  # transformers' last hidden state is after the final norm
            torch.testing.assert_close(block, hidden[layer + 1], **TOL[dtype])
        # residual bookkeeping: layer output = input + attention output + MLP output
        total = previous + trace.get("attn_out", layer) + trace.get("mlp_out", layer)
        torch.testing.assert_close(block, total, **TOL[dtype])
        previous = block
        z = trace.get("attn_o_proj_pre", layer)
        assert z.shape == (2, length, adapter.num_heads * adapter.head_dim)
        assert trace.get("attn_o_proj_pre", layer, per_head=True).shape == (2, length, adapter.num_heads,
                                                                           adapter.head_dim)
        with torch.no_grad():
            projected = adapter.get_o_proj(layer)(z)
        torch.testing.assert_close(projected, trace.get("attn_out", layer), **TOL[dtype])
    torch.testing.assert_close(trace.get("logit_lens_input", n - 1), hidden[-1], **TOL[dtype])
    torch.testing.assert_close(trace.get("final_norm"), hidden[-1], **TOL[dtype])  # the model's own final norm
    torch.testing.assert_close(trace.get("lm_head_input"), hidden[-1], **TOL[dtype])
    for layer in range(n):
        torch.testing.assert_close(trace.get("block_input", layer), hidden[0] if layer == 0 else
                                   trace.get("block_out", layer - 1), **TOL[dtype])
        torch.testing.assert_close(trace.get("mlp_output", layer), trace.get("mlp_out", layer))
        if not adapter.parallel_residual:
            post_attn = trace.get("block_input", layer) + trace.get("attn_output", layer)
            torch.testing.assert_close(trace.get("post_attn_residual", layer), post_attn, **TOL[dtype])
            torch.testing.assert_close(trace.get("mlp_input", layer), adapter.get_mlp_norm(layer)(post_attn),
                                       **TOL[dtype])
    torch.testing.assert_close(trace.get("logits", -1), out.logits, **TOL[dtype])
    with torch.no_grad():
        lens0 = adapter.get_lm_head()(adapter.get_final_norm()(trace.get("block_out", 0)))
    torch.testing.assert_close(trace.get("logits", 0), lens0, **TOL[dtype])


def test_trace_subset_and_errors() -> None:
    model = tiny_model("llama")
    tracer = TransformerTracer(model)
    ids = torch.randint(0, VOCAB, (1, 5))
    trace = tracer.trace(ids, layers=[0, -1], sites=["attn_o_proj_pre", "logits"])
    assert trace.layers == [0, 2]
    assert {(s, layer) for s, per in trace.activations.items() for layer in per} == {
        (s, layer) for s in ("attn_o_proj_pre", "logits") for layer in (0, 2)}
    assert trace.available_sites == ("attn_o_proj_pre", "logits") and trace.has("logits", -1)
    assert not trace.has("logits", 1) and not trace.has("final_norm")
    with pytest.raises(KeyError, match="No capture stored"):
        trace.get("mlp_out", 0)
    with pytest.raises(KeyError, match="global site"):
        tracer.trace(ids, sites=["final_norm"]).get("final_norm", 0)
    default = tracer.trace(ids)
    assert default.available_sites == ("block_output", "final_norm", "logits")
    with pytest.raises(KeyError, match="unknown site"):
        trace.get("mlp", 0)
    with pytest.raises(ValueError, match="unknown site"):
        tracer.trace(ids, sites=["attn"])
    with pytest.raises(IndexError, match="out of range"):
        tracer.trace(ids, layers=[3])
    with pytest.raises(ValueError, match="no tokenizer"):
        tracer.trace("the cat")
    with pytest.raises(ValueError, match="per_head=True"):
        trace.get("logits", 0, per_head=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_matches_rows(family: str, padding_side: str) -> None:
    """Each row of a padded batch traces and scores as it does alone."""
    model = tiny_model(family, torch.float64)
    tokenizer = tiny_tokenizer(padding_side)
    texts = ["the cat sat on a mat and then slept", "a dog ran", "the dog sat"]
    tracer = TransformerTracer(model, tokenizer)
    trace = tracer.trace(texts, sites=["block_out", "mlp_out", "attn_o_proj_pre"])
    scores = tracer.score(texts, temperature=1.5)
    assert trace.attention_mask is not None and trace.input_ids.shape[0] == 3
    for row, text in enumerate(texts):
        alone = tracer.trace(text, sites=["block_out", "mlp_out", "attn_o_proj_pre"])
        real = trace.attention_mask[row].bool()
        for site, per in alone.activations.items():
            for layer, value in per.items():
                torch.testing.assert_close(trace.get(site, layer)[row, real], value[0], **TOL[torch.float64])
        alone_scores = tracer.score(text, temperature=1.5)
        torch.testing.assert_close(scores.final_token_logits()[row], alone_scores.logits[0, -1])
        torch.testing.assert_close(scores.logits[row, real] * 1.5, alone_scores.logits[0] * 1.5)
        torch.testing.assert_close(scores.final_token_log_probs()[row], alone_scores.log_probs[0, -1])
        torch.testing.assert_close(scores.final_token_probs()[row], alone_scores.probs[0, -1])
        torch.testing.assert_close(trace.final_token_logits()[row], alone.final_logits[0, -1])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_score_probabilities(temperature: float) -> None:
    model = tiny_model("gpt2")
    ids = torch.randint(0, VOCAB, (3, 6))
    scores = TransformerTracer(model).score(ids, temperature=temperature)
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(scores.logits, logits / temperature)  # stored as logits / T, as inteprelens
    reference = torch.log_softmax(logits.double() / temperature, dim=-1)
    torch.testing.assert_close(scores.gather_log_probs(ids).double(), reference.gather(-1, ids[..., None])[..., 0],
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(scores.input_ids, ids) and scores.temperature == temperature
    torch.testing.assert_close(scores.log_probs.double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.probs.sum(-1), torch.ones(3, 6))
    assert scores.final_token_probs().shape == (3, VOCAB)
    torch.testing.assert_close(scores.final_token_logits(), logits[:, -1] / temperature)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TransformerTracer(model).score(ids, temperature=0.0)


def test_position_helpers() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    assert last_token_index(mask, 3, 5, torch.device("cpu")).tolist() == [4, 2, 4]
    assert target_positions(mask, -1).tolist() == [4, 2, 4]
    assert target_positions(mask, 0).tolist() == [2, 0, 0]
    assert target_positions(mask, -3).tolist() == [2, 0, 2]
    with pytest.raises(ValueError, match="out of range"):
        target_positions(mask, 3)
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.zeros(1, 3), 1, 3, torch.device("cpu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_per_head_weights_reproduce_projections(family: str) -> None:
    """split_qkv / qkv_weights / o_proj_weight agree with the modules' own outputs."""
    model = tiny_model(family, torch.float64)
    adapter = get_adapter(model)
    x = torch.randn(2, 5, adapter.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        outputs = {tag: module(x) for module, tag in adapter.qkv_modules(1)}
        q, k, v = adapter.split_qkv(outputs)
        wq, wk, wv = adapter.qkv_weights(1)
        bias = {tag: module(torch.zeros_like(x)) for module, tag in adapter.qkv_modules(1)}
        bq, bk, bv = adapter.split_qkv(bias)
        for got, weight, b in ((q, wq, bq), (k, wk, bk), (v, wv, bv)):
            torch.testing.assert_close(got, torch.einsum("blk,hdk->blhd", x, weight) + b)
        z = torch.randn(2, 5, adapter.num_heads * adapter.head_dim, dtype=torch.float64)
        o_proj = adapter.get_o_proj(1)
        expected = o_proj(z) - o_proj(torch.zeros_like(z))
        per_head = torch.einsum("blhd,hkd->blk", z.unflatten(-1, (adapter.num_heads, -1)), adapter.o_proj_weight(1))
        torch.testing.assert_close(per_head, expected)


def test_adapter_rejects_unknown_models() -> None:
    with pytest.raises(ValueError, match="no adapter"):
        get_adapter(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="transformers model"):
        get_adapter("gpt2")
