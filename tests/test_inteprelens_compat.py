"""Unit tests for the inteprelens-compatible pieces: scoring helpers, interventions, sites, LensAPI options,
datasets, CHG results options, autocast in the fused attention (tiny models; parity with the real
inteprelens is in test_inteprelens_parity.py)."""

from __future__ import annotations

import pytest
import torch
from test_chg import ANSWERS, PROMPTS, make_model, make_tokenizer
from test_tracing import VOCAB, tiny_model

import fastgim
from fastgim import (
    CHGDataset,
    CHGResults,
    CHGTrainer,
    InterventionSpec,
    LensAPI,
    MaskedSequenceDataset,
    aggregate_to_sentences,
    apply_interventions,
    apply_temperature,
    gather_token_scores,
    get_sentence_token_spans,
    logits_to_log_probs,
    logits_to_probs,
    select_final_token,
)
from fastgim.adapters import get_adapter
from fastgim.inteprelens.models.adapters import GPT2Adapter, LlamaAdapter
from fastgim.tracing import TransformerTracer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [None, 1.0, 0.7, 3.0])
def test_scoring_helpers_against_float64(dtype: torch.dtype, temperature: float | None):
    logits = torch.randn(3, 97, 11, dtype=dtype)
    reference = torch.log_softmax(logits.double() / (temperature or 1.0), dim=-1)
    log_probs = logits_to_log_probs(logits, temperature)
    assert log_probs.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(log_probs.double(), reference, **tol)
    torch.testing.assert_close(logits_to_probs(logits, temperature).double(), reference.exp(), **tol)
    assert (apply_temperature(logits, temperature) is logits) == (temperature in (None, 1.0))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        apply_temperature(logits, 0.0)


def test_final_token_and_gather():
    values = torch.randn(3, 5, 7)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(select_final_token(values, mask), values[[0, 1, 2], [4, 2, 4]])
    torch.testing.assert_close(select_final_token(values), values[:, -1])
    ids = torch.randint(0, 7, (3, 5))
    torch.testing.assert_close(gather_token_scores(values, ids), values.gather(-1, ids[..., None])[..., 0])
    with pytest.raises(ValueError, match="must match"):
        gather_token_scores(values, ids[:, :4])
    with pytest.raises(ValueError, match="no real token"):
        select_final_token(values, torch.zeros(3, 5))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("site", ["attn_o_proj_pre", "attn_output", "mlp_input", "mlp_output", "block_input",
                                  "block_output", "final_norm", "lm_head_input"])
def test_interventions_change_exactly_the_site(family: str, site: str):
    model = tiny_model(family, torch.float64)
    ids = torch.randint(0, VOCAB, (2, 9))
    layer = None if site in fastgim.GLOBAL_SITES else 1
    tracer = TransformerTracer(model)
    clean = tracer.trace(ids, sites=[site], layers=[1])
    with apply_interventions(model, [InterventionSpec(site, lambda t: t * 2.0, layer=layer)]):
        edited = tracer.trace(ids, sites=[site], layers=[1])
    before, after = clean.get(site, layer), edited.get(site, layer)
    torch.testing.assert_close(after, 2.0 * before)  # the trace hooks run after the intervention's
    assert not torch.equal(edited.final_logits, clean.final_logits)
    after_exit = tracer.trace(ids, sites=[site], layers=[1])
    assert torch.equal(after_exit.final_logits, clean.final_logits)  # hooks removed on exit


def test_intervention_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs a layer"):
        with apply_interventions(model, [InterventionSpec("mlp_output", lambda t: t)]):
            pass
    with pytest.raises(ValueError, match="computed after the forward"):
        with apply_interventions(model, [InterventionSpec("logits", lambda t: t, layer=0)]):
            pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_sites_tables_and_errors():
    assert fastgim.ALL_SITES == ("block_input", "attn_o_proj_pre", "attn_output", "post_attn_residual", "mlp_input",
                                 "mlp_output", "block_output", "final_norm", "lm_head_input", "logits")
    assert fastgim.GLOBAL_SITES == ("final_norm", "lm_head_input")
    assert set(fastgim.LAYER_SITES) == set(fastgim.ALL_SITES) - set(fastgim.GLOBAL_SITES)
    model = tiny_model("gpt_neox")
    with pytest.raises(ValueError, match="parallel-residual"):
        TransformerTracer(model).trace(torch.randint(0, VOCAB, (1, 4)), sites=["post_attn_residual"])


def test_core_logits_and_residuals_helpers():
    from fastgim.inteprelens.core.logits import project_layer_logits, select_layers
    from fastgim.inteprelens.core.residuals import resolve_post_attention_anchor

    model = tiny_model("llama", torch.float64)
    adapter = get_adapter(model)
    trace = TransformerTracer(model).trace(torch.randint(0, VOCAB, (2, 7)), sites=["block_output", "logits"])
    blocks = select_layers(trace.activations["block_output"], [0, 2])
    assert sorted(blocks) == [0, 2]
    for layer, logits in project_layer_logits(adapter, blocks).items():
        assert torch.equal(logits, trace.get("logits", layer))
    block = adapter.get_layers()[1]
    assert resolve_post_attention_anchor(adapter, block) is block.post_attention_layernorm


def test_trace_detach_false_keeps_the_graph_and_model_kwargs_pass_through():
    model = tiny_model("llama")
    tracer = TransformerTracer(model)
    ids = torch.randint(0, VOCAB, (1, 6))
    kept = tracer.trace(ids, sites=["block_output"], layers=[0], detach=False).get("block_output", 0)
    assert kept.requires_grad
    kept.sum().backward()
    assert model.get_input_embeddings().weight.grad is not None
    detached = tracer.trace(ids, sites=["block_output"], layers=[0]).get("block_output", 0)
    assert not detached.requires_grad
    torch.testing.assert_close(detached, kept.detach())
    shifted = tracer.trace(ids, sites=["block_output"], layers=[0], position_ids=torch.zeros(1, 6, dtype=torch.long))
    assert not torch.allclose(shifted.get("block_output", 0), detached)  # model kwargs reach the forward


def test_lens_api_matches_inteprelens_behaviour():
    model, tokenizer = make_model(), make_tokenizer()
    lens = LensAPI(model, tokenizer)
    assert lens.adapter.layout == "llama" and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError):
        lens.trace("the capital of france is")  # keyword-only as inteprelens
    results = lens.fit(texts=PROMPTS, targets=ANSWERS, num_masks=None, num_updates=2, num_reg_updates=2,
                       batch_size=2, verbose=False, seed=0)
    assert results.num_masks is None and results.masks["positive"].shape == (2, 2, 4)
    with pytest.raises(ValueError, match="convention must be"):
        lens.fit(texts=PROMPTS, targets=ANSWERS, convention="paper2", verbose=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_masks must be >= 1"):
            lens.fit(texts=PROMPTS, targets=ANSWERS, num_masks=bad, verbose=False)


def test_adapter_inteprelens_methods_accept_layer_modules():
    model = tiny_model("gpt2")
    adapter = get_adapter(model)
    block = adapter.get_layers()[1]
    assert adapter.get_attention_output_proj(block) is adapter.get_o_proj(1) is block.attn.c_proj
    assert adapter.get_pre_attention_norm(block) is block.ln_1 and adapter.get_pre_mlp_norm(block) is block.ln_2
    assert adapter.get_mlp(block) is block.mlp and adapter.get_attention_module(block) is block.attn
    assert GPT2Adapter(model).layout == "gpt2"
    with pytest.raises(ValueError, match="gpt2 layout"):
        LlamaAdapter(model)
    with pytest.raises(TypeError, match="int index or a decoder layer"):
        adapter.get_mlp("1")


def test_datasets_pattern_task_and_masked_sequence_dataset():
    tokenizer = make_tokenizer()
    pattern = CHGDataset.from_pattern_task("aba", tokenizer, num_samples=6, use_vocab_tokens=False, seed=3)
    assert len(pattern) == 6 and pattern["loss_masks"].any(dim=1).all()
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, tokenizer)
    same = MaskedSequenceDataset(pad_token_id=data.pad_token_id, input_ids=data.input_ids, loss_masks=data.loss_masks)
    assert torch.equal(same.batch(torch.arange(4))["input_ids"], data.batch(torch.arange(4))["input_ids"])
    with pytest.raises(ValueError, match="requires 'input_ids'"):
        MaskedSequenceDataset(0, loss_masks=data.loss_masks)
    with pytest.raises(ValueError, match="no 'loss_masks' field"):  # accepted as inteprelens does, not trainable
        MaskedSequenceDataset(0, input_ids=data.input_ids).training_batches(2)
    with pytest.raises(ValueError, match="unknown pattern"):
        CHGDataset.from_pattern_task("abc", tokenizer, num_samples=2)
    with pytest.raises(ValueError, match="tokenization must be"):
        CHGDataset.from_texts(PROMPTS, ANSWERS, tokenizer, tokenization="gpt")
    with pytest.raises(ValueError, match="global RNG"):
        next(data.training_batches(2, seed=0, order="inteprelens"))


def test_dataloader_order_draws_like_a_dataloader():
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, make_tokenizer())
    torch.manual_seed(5)
    batches = [next(it)["input_ids"] for it in [data.training_batches(1, order="inteprelens")] for _ in range(4)]
    torch.manual_seed(5)
    order = [int(i) for i in torch.utils.data.DataLoader(range(4), batch_size=1, shuffle=True)]
    for batch, index in zip(batches, order):
        assert torch.equal(batch[0], data.batch(torch.tensor([index]))["input_ids"][0])


def test_results_stage_aliases_and_conventions():
    retention = torch.tensor([[[0.9, 0.2], [0.8, 0.1]]])  # (updates, L, H)
    removal = torch.tensor([[[0.7, 0.6], [0.3, 0.2]]])
    paper = CHGResults(masks={"none": retention, "positive": retention, "negative": removal})
    assert torch.equal(paper.masks["positive"], paper.masks["retention"]) and "negative" in paper.masks
    assert paper.necessary_heads() == [(0, 0), (0, 1)] and paper.sufficient_heads() == [(0, 0), (1, 0)]
    ported = CHGResults(masks=paper.masks, convention="inteprelens")
    assert ported.necessary_heads() == [(0, 0), (1, 0)] and ported.sufficient_heads() == [(0, 0), (0, 1)]
    assert ported.head_taxonomy()["taxonomy"].tolist() == ["facilitating", "interfering", "irrelevant", "irrelevant"]
    assert paper.head_taxonomy()["taxonomy"].tolist() == ["facilitating", "ambiguous", "irrelevant", "interfering"]
    assert list(ported.head_taxonomy().columns) == ["layer", "head", "necessary_mask", "sufficient_mask", "taxonomy"]
    assert torch.equal(paper.get_facilitating_mask(), ported.get_facilitating_mask())
    assert paper.to_dataframe()["value"].tolist() == pytest.approx([0.9, 0.2, 0.8, 0.1])
    with pytest.raises(ValueError, match="convention must be"):
        CHGResults(masks=paper.masks, convention="other")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_attention_follows_autocast_like_sdpa(dtype: torch.dtype):
    fused = make_model(seed=3)
    sdpa = make_model(seed=3)
    sdpa.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 20, (2, 13))
    with torch.no_grad():
        reference = fused(ids).logits.double()
        with torch.autocast("cpu", dtype=dtype):
            ours, theirs = fused(ids).logits.double(), sdpa(ids).logits.double()
    assert (ours - reference).abs().max() <= 2 * (theirs - reference).abs().max() + 1e-6


def test_trainer_numerics_options():
    model, tokenizer = make_model(), make_tokenizer()
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, tokenizer)
    assert CHGTrainer(model, data, numerics="inteprelens").autocast_dtype == torch.bfloat16
    assert CHGTrainer(model, data, numerics="inteprelens", autocast="fp32").autocast_dtype is None
    assert CHGTrainer(model, data, autocast="bf16").autocast_dtype == torch.bfloat16
    trainer = CHGTrainer(model, data, num_masks=2, batch_size=2, seed=0)
    records = [record for _, record in trainer.fit(1, 1, verbose=False)]
    assert [record["regularization"] for record in records] == ["none", "positive", "negative"]  # inteprelens' names
    assert [record["stage"] for record in records] == ["none", "retention", "removal"]
    final = trainer.get_final_masks()
    assert trainer.mask_logits_pos is trainer.mask_logits_retention and trainer.mask_logits_neg is not None
    assert torch.equal(final["positive"], trainer.mask_logits_retention.detach().sigmoid())
    with pytest.raises(ValueError, match="numerics must be"):
        CHGTrainer(model, data, numerics="tf")
    with pytest.raises(ValueError, match="autocast must be"):
        CHGTrainer(model, data, autocast="int8")


def test_sentence_spans_and_aggregation():
    tokenizer = make_tokenizer()
    document = "paris is the capital of france .  it has   many people ."
    spans = get_sentence_token_spans(document, ["paris is the capital of france .", "it has many people .",
                                                "rome is old ."], tokenizer)
    assert spans == [(0, 7), (7, 12), (0, 0)]
    values = torch.arange(12.0)
    torch.testing.assert_close(aggregate_to_sentences(values, spans, "mean"), torch.tensor([3.0, 9.0, 0.0]))
    torch.testing.assert_close(aggregate_to_sentences(values, spans, "max"), torch.tensor([6.0, 11.0, 0.0]))
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_to_sentences(values, spans, "median")
