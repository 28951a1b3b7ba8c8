"""CHG's two gate paths (fused attention op, inteprelens' o_proj pre-hooks), custom adapters, compile, head_dim."""

from __future__ import annotations

import threading

import pytest
import torch
from test_chg import ANSWERS, PROMPTS, make_model, make_tokenizer
from test_tracing import VOCAB, tiny_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from fastgim import CHG, CHGDataset, CHGTrainer, LensAPI
from fastgim.adapters import ModelAdapter, get_adapter
from fastgim.o_proj_gates import o_proj_head_gates

FAMILIES = ["llama", "qwen3", "gpt2", "gpt_neox"]
TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2}}


def gated_logp(chg: CHG, gates: torch.Tensor, ids: torch.Tensor, loss_masks: torch.Tensor):
    """Per-token log-probs ``(batch, num_masks, seq - 1)`` and their gradient with respect to the gates."""
    gates = gates.clone().requires_grad_(True)
    logp = chg.get_logp(gates, ids, loss_masks, agg="none")
    (logp * torch.linspace(0.5, 1.5, logp.shape[-1])).sum().backward()
    return logp.detach(), gates.grad


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def target_masks(batch: int, length: int) -> torch.Tensor:
    masks = torch.zeros(batch, length, dtype=torch.bool)
    masks[:, length // 2:] = True
    return masks


# --------------------------------------------------------------------------- hook gate == fused gate


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_masks", [1, 3])
def test_hook_gate_agrees_with_the_fused_gate(family: str, dtype: torch.dtype, num_masks: int):
    model = tiny_model(family, dtype)
    ids = torch.randint(0, VOCAB, (2, 9))
    gates = torch.rand(num_masks, *CHG(model).mask_shape)
    fused, fused_grad = gated_logp(CHG(model), gates, ids, target_masks(2, 9))
    hooked, hooked_grad = gated_logp(CHG(model, gate="hook"), gates, ids, target_masks(2, 9))
    torch.testing.assert_close(hooked, fused, **TOL[dtype])
    torch.testing.assert_close(hooked_grad, fused_grad, **{k: 5 * v for k, v in TOL[dtype].items()})
    assert hooks_on(model) == 0 and model.config._attn_implementation == "gim_fused"


def test_hook_gate_against_a_float64_reference():
    """Both paths in float32 stay within 2x of each other's error against the float64 fused result."""
    model = tiny_model("llama", torch.float64)
    ids, masks = torch.randint(0, VOCAB, (2, 97)), target_masks(2, 97)
    gates = torch.rand(2, *CHG(model).mask_shape, dtype=torch.float64)
    reference, _ = gated_logp(CHG(model), gates, ids, masks)
    model.float()
    fused, _ = gated_logp(CHG(model), gates.float(), ids, masks)
    hooked, _ = gated_logp(CHG(model, gate="hook"), gates.float(), ids, masks)
    fused_error = (fused.double() - reference).abs().max()
    assert (hooked.double() - reference).abs().max() <= 2 * fused_error + 1e-6


def test_explicit_head_dim_is_used_by_both_paths():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         attn_implementation="gim_fused")
    model = LlamaForCausalLM(config).eval()
    chg = CHG(model)
    assert chg.head_dim == 16 == get_adapter(model).head_dim != config.hidden_size // config.num_attention_heads
    ids = torch.randint(0, VOCAB, (2, 7))
    gates = torch.rand(2, 2, 4)
    fused, _ = gated_logp(chg, gates, ids, target_masks(2, 7))
    hooked, _ = gated_logp(CHG(model, gate="hook"), gates, ids, target_masks(2, 7))
    torch.testing.assert_close(hooked, fused, **TOL[torch.float32])
    assert CHG(tiny_model("gpt2")).head_dim == 6  # no head_dim in the config: hidden_size // num_heads


# --------------------------------------------------------------------------- inteprelens-style custom adapters


class Backbone(nn.Module):
    """A model fastgim knows no layout of, whose attention does not take the fused gate."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.net = inner
        self.config = inner.config

    def get_input_embeddings(self) -> nn.Module:
        return self.net.get_input_embeddings()

    def forward(self, input_ids=None, **kwargs):
        return self.net(input_ids=input_ids, **kwargs)


class BackboneAdapter(ModelAdapter):
    """inteprelens' documented way: subclass, call ``super().__init__(model)``, override two methods."""

    def __init__(self, model: nn.Module):
        super().__init__(model)

    def get_layers(self) -> nn.ModuleList:
        return self.model.net.model.layers

    def get_attention_output_proj(self, layer: nn.Module) -> nn.Module:
        return self._resolve_layer(layer).self_attn.o_proj


def test_custom_adapter_gates_a_model_without_fused_attention():
    inner = make_model(seed=1)
    model = Backbone(inner)
    with pytest.raises(TypeError, match="AttentionInterface"):
        CHG(model)  # no adapter and no fused attention: a clear error
    with pytest.raises(ValueError, match="override get_layers"):
        ModelAdapter(model)
    adapter = BackboneAdapter(model)
    assert adapter.layout is None and adapter.num_layers == 2 and adapter.head_dim == 8
    assert adapter.get_o_proj(1) is inner.model.layers[1].self_attn.o_proj  # fastgim's name sees the override
    chg = CHG(model, adapter=adapter)
    assert chg.gate == "hook" and chg.adapter is adapter and chg.mask_shape == (2, 4)
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, make_tokenizer())
    gates = torch.rand(3, 2, 4)
    hooked, hooked_grad = gated_logp(chg, gates, data.input_ids, data.loss_masks)
    fused, fused_grad = gated_logp(CHG(inner), gates, data.input_ids, data.loss_masks)
    torch.testing.assert_close(hooked, fused, **TOL[torch.float32])
    torch.testing.assert_close(hooked_grad, fused_grad, **TOL[torch.float32])
    assert hooks_on(model) == 0


def test_custom_adapter_in_the_trainer_and_lens_api():
    inner = make_model(seed=2)
    model, tokenizer = Backbone(inner), make_tokenizer()
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, tokenizer)
    runs = {}
    for name, target, adapter in (("hook", model, BackboneAdapter(model)), ("fused", inner, None)):
        trainer = CHGTrainer(target, data, num_masks=2, batch_size=2, seed=0, adapter=adapter)
        runs[name] = [mask for mask, _ in trainer.fit(2, 2, verbose=False)]
    for hooked, fused in zip(runs["hook"], runs["fused"]):
        torch.testing.assert_close(hooked, fused, atol=1e-4, rtol=0)
    lens = LensAPI(model, tokenizer, adapter=BackboneAdapter(model))
    results = lens.fit(texts=PROMPTS, targets=ANSWERS, num_masks=2, num_updates=1, num_reg_updates=1, batch_size=2,
                       verbose=False, seed=0)
    assert results.masks["positive"].shape == (1, 2, 2, 4) and hooks_on(model) == 0


def test_adapter_errors_leave_nothing_on_the_model():
    model = make_model(seed=3)

    class WrongProjection(ModelAdapter):  # the MLP's down projection has the wrong input width
        def get_attention_output_proj(self, layer):
            return self._resolve_layer(layer).mlp.down_proj

    chg = CHG(model, adapter=WrongProjection(model), gate="hook")
    ids = torch.randint(3, 20, (2, 6))
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        chg.forward(ids, torch.rand(2, 4))
    assert hooks_on(model) == 0
    with pytest.raises(RuntimeError, match="boom"), chg.gating(torch.rand(2, 4)):
        assert hooks_on(model) == 2
        raise RuntimeError("boom")
    assert hooks_on(model) == 0
    with pytest.raises(ValueError, match="gate must be"):
        CHG(model, gate="hooks")
    with pytest.raises(ValueError, match="num_layers = 2"):
        with o_proj_head_gates(get_adapter(model), torch.rand(3, 4)):
            pass


def test_hooks_are_shared_reference_counted_and_inert_for_other_calls():
    model = make_model(seed=4)
    chg = CHG(model, gate="hook")
    ids = torch.randint(3, 20, (2, 6))
    plain = model(ids).logits
    seen = {}

    def other_thread() -> None:  # plain inference elsewhere while a gated block is open
        seen["logits"] = model(ids).logits

    with chg.gating(torch.zeros(2, 4)):
        with chg.gating(torch.ones(2, 4)):  # nested blocks share the one hook per projection
            assert hooks_on(model) == 2
        assert hooks_on(model) == 2
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        off = model(ids).logits
    assert hooks_on(model) == 0
    torch.testing.assert_close(seen["logits"], plain, rtol=0, atol=0)
    assert not torch.allclose(off, plain)  # every head off changes the output
    torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)


# --------------------------------------------------------------------------- trainer details


def test_fastgim_numerics_clip_each_mask_on_its_own():
    model = make_model(seed=5)
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, make_tokenizer())
    trainer = CHGTrainer(model, data, num_masks=3, batch_size=4, seed=0, grad_norm=1e-3)
    logits = trainer.mask_logits
    trainer._update(logits, 0.0)
    norms = logits.grad.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((3,), 1e-3), rtol=1e-3, atol=0)


def test_inteprelens_stage_names_in_metrics_and_fit_stage():
    model = make_model(seed=6)
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, make_tokenizer())
    trainer = CHGTrainer(model, data, num_masks=2, batch_size=2, seed=0)
    for name, stage in (("none", "none"), ("positive", "retention"), ("negative", "removal")):
        (_, metrics), = list(trainer.fit_stage(name, 1, show_progress=False))
        assert list(metrics)[:4] == ["regularization", "num_update", "nll", "L1"]  # inteprelens' keys first
        assert metrics["regularization"] == name and metrics["stage"] == stage
    assert trainer.mask_logits_pos is not None and trainer.mask_logits_neg is not None


def test_inteprelens_numerics_leave_the_model_as_it_was():
    model = make_model(seed=9)
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, make_tokenizer(), tokenization="inteprelens")
    torch.manual_seed(0)
    trainer = CHGTrainer(model, data, num_masks=2, batch_size=2, numerics="inteprelens")
    assert trainer.masked_model.gate == "hook"
    seen = []
    trainer.masked_model.model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: seen.append(len(module._forward_pre_hooks)))
    records = [metrics for _, metrics in trainer.fit(1, 1, verbose=False)]
    assert [m["regularization"] for m in records] == ["none", "positive", "negative"] and seen
    assert set(seen) == {2}  # the gate hook was there during the fit (ours + the probe) ...
    assert hooks_on(model) == 1 and model.config._attn_implementation == "gim_fused"  # ... and only then
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- compile


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(("gate", "backend"), [("fused", "aot_eager"), ("hook", "eager")])
def test_compiled_chg_matches_uncompiled_and_leaves_the_model_alone(fresh_dynamo, gate: str, backend: str):
    """Dynamo traces the model (aot_eager: the gate gradient through the compiled graph); the slow test below
    runs inductor. With hook gates only unmasked calls run compiled."""
    model = make_model(seed=7, layers=1)
    parameters = list(model.parameters())
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, make_tokenizer())
    gates = torch.rand(2, 1, 4)
    eager = CHG(model, gate=gate)
    expected, expected_grad = gated_logp(eager, gates, data.input_ids, data.loss_masks)
    chg = CHG(model, gate=gate)
    assert chg.compile(backend=backend) is chg and chg.model is model and chg.compiled_model is not model
    got, grad = gated_logp(chg, gates, data.input_ids, data.loss_masks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    other = torch.rand(2, 1, 4)  # new gate values: no stale graph
    torch.testing.assert_close(chg.get_logp(other, data.input_ids, data.loss_masks),
                               eager.get_logp(other, data.input_ids, data.loss_masks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chg(data.input_ids), model(data.input_ids).logits, rtol=1e-5, atol=1e-5)
    with chg.gating(torch.zeros(2, 1, 4)), torch.no_grad():  # a caller's own gating block around a plain call
        off = chg(data.input_ids[:2])
    with eager.gating(torch.zeros(2, 1, 4)), torch.no_grad():
        torch.testing.assert_close(off, eager(data.input_ids[:2]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(off, model(data.input_ids[:2]).logits)
    assert list(model.parameters()) == parameters and hooks_on(model) == 0
    assert model.config._attn_implementation == "gim_fused" and type(model) is LlamaForCausalLM


@pytest.mark.slow
def test_compile_with_inductor_reduce_overhead(fresh_dynamo):
    """inteprelens' default call, ``chg.compile()``, really compiles on the CPU (inductor) and agrees."""
    model = make_model(seed=8, layers=1)
    data = CHGDataset.from_texts(PROMPTS, ANSWERS, make_tokenizer())
    gates = torch.rand(2, 1, 4)
    expected = CHG(model).get_logp(gates, data.input_ids, data.loss_masks)
    chg = CHG(model).compile()
    with torch.no_grad():
        got = chg.get_logp(gates, data.input_ids, data.loss_masks)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
