"""GIM on every supported family: exact forwards, explain vs the independent reference, restoration."""

from __future__ import annotations

import pytest
import torch
import transformers
from reference_gim import FAMILIES, VOCAB, build_model, reference_explain, routes_through_attention_interface

from fastgim.explain import explain
from fastgim.gim import GIM

OFF = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None, gate_scale=None,
           up_scale=None)
RULES = {
    "freeze_norm": {**OFF, "freeze_norm": True},
    "temperature": {**OFF, "softmax_temperature": 2.0},
    "qkv": {**OFF, "q_scale": 0.25, "k_scale": 0.25, "v_scale": 0.5},
    "mlp": {**OFF, "gate_scale": 0.5, "up_scale": 0.5},
    "all": {},
}
SEQ = 11

_MODELS: dict[str, torch.nn.Module] = {}


def _model(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    if not routes_through_attention_interface(family):
        pytest.skip(f"transformers {transformers.__version__} does not route {family}'s attention through "
                    "AttentionInterface (see test_gim_errors.py)")
    key = f"{family}-{dtype}"
    if key not in _MODELS:
        _MODELS[key] = build_model(family).to(dtype)
    return _MODELS[key]


def _inputs(family: str, padding: str | None, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[1, -4:] = 0
        mask[2, -1:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _bert_target(outputs):
    return outputs.logits[:, 0, 7] - outputs.logits[:, 0, 9]


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gim_fused_forward_matches_eager_and_gim_is_bit_exact(family, padding):
    model = _model(family)
    ids, mask = _inputs(family, padding, seed=hash((family, padding)) % 1000)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**kwargs).logits
        model.set_attn_implementation("gim_fused")
        fused = model(**kwargs).logits
        with GIM(model):
            fused_gim = model(**kwargs).logits
        model.set_attn_implementation("eager")
    real = mask.bool()
    torch.testing.assert_close(fused[real], eager[real], rtol=1e-5, atol=2e-5)
    assert torch.equal(fused_gim, fused), "the forward inside GIM must equal the gim_fused forward bit for bit"


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("family", FAMILIES)
def test_explain_matches_reference(family, rule):
    model = _model(family)
    settings = RULES[rule]
    padding = "right" if family == "bert" else "left"
    ids, mask = _inputs(family, padding, seed=len(rule) + 7 * FAMILIES.index(family))
    target = _bert_target if family == "bert" else None
    contrast = None if family == "bert" else 5
    got = explain(model, ids, attention_mask=mask, baseline_token_id=0, target=target, contrast_token_id=contrast,
                  **settings)
    kwargs = dict(attention_mask=mask, baseline_token_id=0, target=target, contrast_token_id=contrast, **settings)
    truth = reference_explain(_model(family, torch.float64), ids, **kwargs)
    want = reference_explain(model, ids, **kwargs)  # the same-precision (fp32) PyTorch path
    assert got.shape == ids.shape and got.dtype == torch.float32
    scale = truth.abs().max().item()
    # accuracy policy: at most 3x the fp32 reference's error against float64, plus a tiny epsilon
    err, err_ref = (got.double() - truth).abs().max().item(), (want - truth).abs().max().item()
    assert err <= 3 * err_ref + 2e-5 * scale, (err, err_ref, scale)
    assert (got[mask == 0] == 0).all()
    if rule in ("all", "temperature") and family not in ("bert",):
        plain = reference_explain(model, ids, attention_mask=mask, baseline_token_id=0, target=target,
                                  contrast_token_id=contrast, **OFF)
        assert (plain - want).abs().max().item() > 1e-3 * scale, "the rule must visibly change the attribution"


SDPA_FAMILIES = ["llama", "mistral", "qwen3", "gemma3", "phi3", "gpt2", "bert", "mixtral"]


@pytest.mark.parametrize("rule", ["all", "temperature"])
@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_explain_matches_reference_on_sdpa_backend(family, rule, monkeypatch):
    """GIM from PyTorch's own attention kernels (GQA, padding, sliding windows, bidirectional)."""
    monkeypatch.setenv("FASTGIM_BACKEND", "sdpa")
    test_explain_matches_reference(family, rule)


def test_sdpa_backend_refuses_softcap_models(monkeypatch):
    monkeypatch.setenv("FASTGIM_BACKEND", "sdpa")
    ids, mask = _inputs("gemma2", "left", seed=3)
    with pytest.raises(ValueError, match="cannot apply a logit softcap.*backend='torch'"):
        explain(_model("gemma2"), ids, attention_mask=mask, baseline_token_id=0, contrast_token_id=5)


def _snapshot(model):
    own = {name: sorted(k for k in ("forward", "_apply_gate") if k in m.__dict__) for name, m in model.named_modules()}
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return own, hooks, flags, weights, model.config._attn_implementation


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "mixtral", "gemma3"])
def test_everything_restored_after_exception_inside_block(family):
    model = _model(family)
    before = _snapshot(model)
    with pytest.raises(KeyError, match="boom"):
        with GIM(model):
            assert model.config._attn_implementation == "gim_fused"
            raise KeyError("boom")
    after = _snapshot(model)
    assert before[0] == after[0] and before[1] == after[1] and before[2] == after[2] and before[4] == after[4]
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])


@pytest.mark.parametrize("rule", ["mlp", "all"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_eager_experts_path(family, rule):
    """The eager experts loop (torch-function-mode patch), next to the default grouped_mm path above."""
    model = build_model(family, seed=21)
    model.config._experts_implementation = "eager"
    ids, mask = _inputs(family, "left", seed=5)
    kwargs = dict(attention_mask=mask, baseline_token_id=0, contrast_token_id=5, **RULES[rule])
    got = explain(model, ids, **kwargs)
    want = reference_explain(model, ids, **kwargs)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * want.abs().max().item())
    plain = reference_explain(model, ids, **{**kwargs, **OFF})
    assert (plain - want).abs().max() > 1e-3 * want.abs().max()
