"""GIM on any PyTorch model through the thread-local function mode (``fastgim.function_mode``).

Every model is checked against an independent reference in the approach of ``reference_gim``: eager maths
with the rules written out as explicit autograd functions (``TemperatureSoftmax``, ``GradScale``,
frozen-statistics norm forwards, tensor hooks on the gate / up projections), in float64 as the truth
and float32 as the same-precision baseline, with sharpened attention so the temperature matters.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from reference_gim import GradScale, TemperatureSoftmax
from reference_gim import _layer_norm_forward as reference_layer_norm
from reference_gim import _reference_norm as reference_hf_norm
from reference_gim import _rms_forward as reference_rms_norm
from torch import nn
from torch.overrides import TorchFunctionMode

from fastgim import function_mode
from fastgim.explain import explain
from fastgim.gim import GIM
from fastgim.settings import GIMSettings, use_settings

OFF = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None, gate_scale=None,
           up_scale=None)
DEFAULTS = dict(freeze_norm=True, softmax_temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5, gate_scale=0.5,
                up_scale=0.5)
RULES = {
    "all": DEFAULTS,
    "temperature": {**OFF, "softmax_temperature": 2.0},
    "qkv": {**OFF, "q_scale": 0.25, "k_scale": 0.5, "v_scale": 0.5},
    "norm": {**OFF, "freeze_norm": True},
}
VOCAB, WIDTH, HEADS, SEQ = 61, 32, 4, 9

# --------------------------------------------------------------------------- the reference rules

_REF: dict[str, float] = {}


def reference_attention(q, k, v, *, causal: bool, additive_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eager attention with the GIM rules written out (q / k / v scales, temperature softmax)."""
    q = GradScale.apply(q, _REF.get("q_scale", 1.0))
    k = GradScale.apply(k, _REF.get("k_scale", 1.0))
    v = GradScale.apply(v, _REF.get("v_scale", 1.0))
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        lq, lk = scores.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if additive_mask is not None:
        scores = scores + additive_mask.to(scores.dtype)
    return TemperatureSoftmax.apply(scores, _REF.get("temperature", 1.0)) @ v


def _set_reference(settings: dict) -> None:
    _REF.clear()
    _REF.update(temperature=settings["softmax_temperature"] or 1.0, q_scale=settings["q_scale"] or 1.0,
                k_scale=settings["k_scale"] or 1.0, v_scale=settings["v_scale"] or 1.0)


def _scale_output(scale: float):
    def hook(_module, _inputs, output):
        if output.requires_grad:
            output.register_hook(lambda g: g * scale)

    return hook


class reference_rules:  # noqa: N801 - a context manager used like a function
    """Reference GIM on a hand-written model: impl="reference" attention, frozen norms, gate / up hooks."""

    def __init__(self, model: nn.Module, settings: dict) -> None:
        self.model, self.settings, self.undo = model, settings, []

    def __enter__(self):
        _set_reference(self.settings)
        for module in self.model.modules():
            if hasattr(module, "impl"):
                previous = module.impl
                module.impl = "reference"
                self.undo.append(lambda m=module, p=previous: setattr(m, "impl", p))
            if self.settings["freeze_norm"] and isinstance(module, (LayerNorm, nn.LayerNorm, RMSNorm, nn.RMSNorm)):
                module.forward = (reference_layer_norm(module) if isinstance(module, (LayerNorm, nn.LayerNorm))
                                  else reference_rms_norm(module, "olmo2", 0.0, module.eps))
                self.undo.append(lambda m=module: delattr(m, "forward"))
            if isinstance(getattr(module, "gate_proj", None), nn.Linear):
                for name, key in (("gate_proj", "gate_scale"), ("up_proj", "up_scale")):
                    scale = self.settings[key]
                    if scale is not None:
                        handle = getattr(module, name).register_forward_hook(_scale_output(scale))
                        self.undo.append(handle.remove)
        return self.model

    def __exit__(self, *exc):
        for step in reversed(self.undo):
            step()


# --------------------------------------------------------------------------- hand-written models


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: optional bias, ``F.layer_norm`` in the forward (not an ``nn.LayerNorm``)."""

    def __init__(self, width: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """A hand-written RMSNorm (``pow / mean / rsqrt``, no functional norm call)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``impl`` "sdpa" (F.scaled_dot_product_attention), "eager" or "reference"."""

    def __init__(self, causal: bool, impl: str, kv_heads: int = HEADS) -> None:
        super().__init__()
        self.q = nn.Linear(WIDTH, WIDTH)
        self.kv = nn.Linear(WIDTH, 2 * WIDTH // HEADS * kv_heads)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.causal, self.impl, self.kv_heads = causal, impl, kv_heads

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        dim = WIDTH // HEADS
        q = self.q(x).view(batch, length, HEADS, dim).transpose(1, 2)
        k, v = self.kv(x).view(batch, length, 2 * self.kv_heads, dim).transpose(1, 2).chunk(2, dim=1)
        additive = None if mask is None else torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, float("-inf"))
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                               enable_gqa=self.kv_heads != HEADS)
        elif self.impl == "eager":
            k = k.repeat_interleave(HEADS // self.kv_heads, dim=1)
            v = v.repeat_interleave(HEADS // self.kv_heads, dim=1)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dim))
            if self.causal:
                att = att.masked_fill(torch.ones(length, length, dtype=torch.bool).tril().logical_not(), float("-inf"))
            if additive is not None:
                att = att + additive
            y = F.softmax(att, dim=-1) @ v
        else:
            y = reference_attention(q, k, v, causal=self.causal, additive_mask=additive)
        return self.proj(y.transpose(1, 2).reshape(batch, length, WIDTH))


class GeluMLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(WIDTH, 48, bias=False), nn.Linear(WIDTH, 48, bias=False)
        self.down_proj = nn.Linear(48, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, norm: type, mlp: type, causal: bool, impl: str, kv_heads: int = HEADS) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = norm(WIDTH), SelfAttention(causal, impl, kv_heads), norm(WIDTH), mlp()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """nanoGPT: learned positions, pre-LN blocks, ``forward(idx) -> (logits, loss)``; no get_input_embeddings."""

    def __init__(self, impl: str = "sdpa", norm: type = LayerNorm, mlp: type = GeluMLP, kv_heads: int = HEADS):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(32, WIDTH)
        self.h = nn.ModuleList([Block(norm, mlp, True, impl, kv_heads) for _ in range(2)])
        self.ln_f = norm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, embeds: torch.Tensor | None = None):
        x = (self.wte(idx) if embeds is None else embeds) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x)), None


class TinyLlama(TinyGPT):
    """Hand-written RMSNorm + SwiGLU + GQA decoder (no learned positions); has get_input_embeddings."""

    def __init__(self, impl: str = "sdpa"):
        super().__init__(impl, norm=RMSNorm, mlp=SwiGLU, kv_heads=2)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte


class TinyViT(nn.Module):
    """A ViT-style bidirectional encoder (nn.LayerNorm, GELU MLP, CLS token) over token ids, with padding."""

    def __init__(self, impl: str = "sdpa"):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.cls = nn.Parameter(torch.randn(1, 1, WIDTH) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 33, WIDTH) * 0.5)
        self.blocks = nn.ModuleList([Block(nn.LayerNorm, GeluMLP, False, impl) for _ in range(2)])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 5)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([self.cls.expand(ids.shape[0], -1, -1), self.embed(ids)], dim=1) + self.pos[:, : ids.shape[1] + 1]
        mask = None
        if attention_mask is not None:
            keys = torch.cat([attention_mask.new_ones(ids.shape[0], 1), attention_mask], dim=1).bool()
            mask = keys[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x)[:, 0])


def _sharpen(model: nn.Module, factor: float = 6.0) -> nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.05)
            if name.endswith(("attn.q.weight", "attn.kv.weight")):
                param.mul_(factor)
    return model.eval()


def _build(cls: type, impl: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _sharpen(cls(impl))


def _twin(model: nn.Module, impl: str) -> nn.Module:
    twin = type(model)(impl)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


# --------------------------------------------------------------------------- reference attributions


def reference_attributions(model: nn.Module, ids: torch.Tensor, settings: dict, *, score, baseline: int = 0,
                           embeddings: nn.Embedding, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference GIM attributions ``[batch, seq]`` in float64, one unpadded row at a time."""
    mask = torch.ones_like(ids) if mask is None else mask
    result = torch.zeros(ids.shape, dtype=torch.float64)
    with reference_rules(model, settings):
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            row_ids = ids[row][real][None]
            emb = embeddings(row_ids).detach().requires_grad_(True)
            base = embeddings(torch.full_like(row_ids, baseline)).detach()
            handle = embeddings.register_forward_hook(lambda _m, _a, _o, e=emb: e)
            try:
                out = model(row_ids)
            finally:
                handle.remove()
            (grad,) = torch.autograd.grad(score(out), emb)
            result[row, real] = (grad.double() * (emb.double() - base.double())).sum(-1)[0]
    return result


def _assert_policy(got: torch.Tensor, model: nn.Module, ids: torch.Tensor, settings: dict, **kwargs) -> None:
    """``got`` within 3x the fp32 reference's error against the float64 reference (plus a tiny epsilon)."""
    truth_model = _twin(model, "eager").double()
    truth = reference_attributions(truth_model, ids, settings, embeddings=_embeddings(truth_model), **kwargs)
    want = reference_attributions(model, ids, settings, embeddings=_embeddings(model), **kwargs)
    scale = truth.abs().max().item()
    err, err_ref = (got.double() - truth).abs().max().item(), (want - truth).abs().max().item()
    assert err <= 3 * err_ref + 2e-6 * scale, (err, err_ref, scale)
    return want


def _embeddings(model: nn.Module) -> nn.Embedding:
    return model.embed if isinstance(model, TinyViT) else model.wte


def _lm_score(token: int = 7):
    return lambda out: out[0][0, -1, token] if isinstance(out, tuple) else out.logits[0, -1, token]


def _ids(batch: int = 2, length: int = SEQ, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- hand-written models vs reference


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_nanogpt_explain_matches_reference(impl, rule):
    model = _build(TinyGPT, impl)
    ids = _ids()
    got = explain(model, ids, target_token_id=7, baseline_token_id=0, embeddings=model.wte, **RULES[rule])
    assert got.shape == ids.shape and got.dtype == torch.float32
    want = _assert_policy(got, model, ids, RULES[rule], score=_lm_score(7))
    if rule in ("all", "temperature"):
        plain = reference_attributions(model, ids, OFF, score=_lm_score(7), embeddings=model.wte)
        assert (plain - want).abs().max() > 1e-3 * want.abs().max(), "the rule must visibly change the attribution"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("cls", [TinyGPT, TinyLlama])
def test_half_precision_within_accuracy_policy(cls, impl, dtype):
    model = _build(cls, impl).to(dtype)
    ids = _ids(seed=13)
    got = explain(model, ids, target_token_id=7, baseline_token_id=0, embeddings=model.wte)
    _assert_policy(got, model, ids, DEFAULTS, score=_lm_score(7))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_float64_model_keeps_float64_in_the_backward(impl):
    model = _build(TinyGPT, impl, seed=6).double()  # functional LayerNorm: the mode's frozen norm
    ids = _ids(seed=14)
    with GIM(model):
        got = _plain_grad(model, ids)
    with reference_rules(model, DEFAULTS):
        want = _plain_grad(model, ids)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_checkpointed_blocks_recompute_under_the_mode(impl):
    model = _build(TinyGPT, impl, seed=5)
    ids = _ids(seed=12)
    kwargs = dict(target_token_id=3, baseline_token_id=0, embeddings=model.wte)
    torch.testing.assert_close(explain(model, ids, checkpoint=True, **kwargs), explain(model, ids, **kwargs),
                               rtol=0, atol=1e-6)


def test_nanogpt_sdpa_and_eager_twins_agree():
    sdpa = _build(TinyGPT, "sdpa")
    eager = _twin(sdpa, "eager")
    ids = _ids(seed=11)
    a = explain(sdpa, ids, target_token_id=3, baseline_token_id=0, embeddings=sdpa.wte)
    b = explain(eager, ids, target_token_id=3, baseline_token_id=0, embeddings=eager.wte)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * a.abs().max().item())


@pytest.mark.parametrize("rule", ["all", "qkv"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_rmsnorm_swiglu_gqa_model_matches_reference(impl, rule):
    model = _build(TinyLlama, impl, seed=1)
    ids = _ids(seed=5)
    settings = {**RULES[rule], "gate_scale": 0.5, "up_scale": 0.25} if rule == "all" else RULES[rule]
    got = explain(model, ids, target_token_id=4, contrast_token_id=9, baseline_token_id=0, **settings)

    def score(out):
        return out[0][0, -1, 4] - out[0][0, -1, 9]

    _assert_policy(got, model, ids, settings, score=score)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_vit_style_encoder_with_padding_matches_reference(impl):
    model = _build(TinyViT, impl, seed=2)
    ids = _ids(batch=3, seed=8)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[2, -1:] = 0

    def target(out):
        return out[:, 2] - out[:, 0]

    got = explain(model, ids, attention_mask=mask, baseline_token_id=0, target=target)
    assert (got[mask == 0] == 0).all()

    def score(out):
        return target(out)[0]

    _assert_policy(got, model, ids, DEFAULTS, score=score, mask=mask)


# --------------------------------------------------------------------------- the SDPA mapping


def _reference_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """Plain eager SDPA semantics (top-left causal, bool / additive masks, GQA) through the reference rules."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    q = GradScale.apply(q, _REF["q_scale"]) * (scale if scale is not None else q.shape[-1] ** -0.5)
    k, v = GradScale.apply(k, _REF["k_scale"]), GradScale.apply(v, _REF["v_scale"])
    scores = q @ k.transpose(-1, -2)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return TemperatureSoftmax.apply(scores, _REF["temperature"]) @ v


def _alibi(heads: int, lq: int, lk: int) -> torch.Tensor:
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(heads)])
    distance = torch.arange(lk)[None, :] - (torch.arange(lq)[:, None] + lk - lq)
    return (slopes[:, None, None] * distance.clamp(max=0))[None]


SDPA_CASES = {
    "causal_square": dict(lq=7, lk=7, is_causal=True),
    "causal_top_left_q_shorter": dict(lq=4, lk=9, is_causal=True),
    "causal_top_left_q_longer": dict(lq=9, lk=5, is_causal=True),
    "bool_mask_2d": dict(lq=6, lk=8, mask="bool2d"),
    "bool_mask_4d_and_causal": dict(lq=8, lk=8, mask="bool4d", is_causal=True),
    "alibi_additive": dict(lq=8, lk=8, mask="alibi"),
    "gqa_scale": dict(lq=5, lk=5, is_causal=True, gqa=True, scale=0.3),
    "three_d": dict(lq=6, lk=6, three_d=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_mapping_forward_and_gim_backward(case, dtype):
    c = SDPA_CASES[case]
    heads, kv_heads = 4, (2 if c.get("gqa") else 4)
    gen = torch.Generator().manual_seed(len(case))

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2).to(dtype).requires_grad_(True)

    if c.get("three_d"):
        q, k, v = rnd(2, c["lq"], 16), rnd(2, c["lk"], 16), rnd(2, c["lk"], 16)
    else:
        q, k, v = rnd(2, heads, c["lq"], 16), rnd(2, kv_heads, c["lk"], 16), rnd(2, kv_heads, c["lk"], 16)
    mask = None
    if c.get("mask") == "bool2d":
        mask = torch.rand(c["lq"], c["lk"], generator=gen) > 0.3
        mask[:, 0] = True
    elif c.get("mask") == "bool4d":
        mask = torch.rand(2, 1, c["lq"], c["lk"], generator=gen) > 0.3
        mask[..., 0] = True
    elif c.get("mask") == "alibi":
        mask = _alibi(heads, c["lq"], c["lk"]).to(dtype)
    kwargs = dict(attn_mask=mask, is_causal=c.get("is_causal", False), scale=c.get("scale"),
                  enable_gqa=bool(c.get("gqa")))
    dout = torch.randn(q.shape[:-1] + (16,), generator=gen, dtype=torch.float64).to(dtype)
    settings = GIMSettings(softmax_temperature=2.0, q_scale=0.25, k_scale=0.5, v_scale=0.75)
    with use_settings(settings), function_mode.activate(attention=True, softmax_scope="attention"):
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        got = torch.autograd.grad(out, (q, k, v), dout)
    expected_out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    _REF.update(temperature=2.0, q_scale=0.25, k_scale=0.5, v_scale=0.75)
    want = torch.autograd.grad(_reference_sdpa(q, k, v, **kwargs), (q, k, v), dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_sdpa_dropout_is_an_error_and_no_grad_passes_through():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    with use_settings(GIMSettings()), function_mode.activate(attention=True, softmax_scope="attention"):
        with pytest.raises(ValueError, match="dropout_p=0.1"):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
        with torch.no_grad():
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, q, q, is_causal=True))


# --------------------------------------------------------------------------- softmax scope


class RouterModel(TinyGPT):
    """TinyGPT whose MLP output is gated by a 2-D router softmax (MoE-router-like)."""

    def __init__(self, impl: str = "sdpa"):
        super().__init__(impl)
        self.router = nn.Linear(WIDTH, 3)

    def forward(self, idx, targets=None):
        logits, _ = super().forward(idx)
        weights = torch.softmax(self.router(self.wte(idx)).flatten(0, 1), dim=-1)
        return logits * weights[:, :1].reshape(idx.shape[0], idx.shape[1], 1), None


def test_softmax_scope_attention_leaves_router_softmax_alone_and_all_changes_it():
    model = _build(RouterModel, "eager", seed=4)
    ids = _ids(batch=1, seed=2)
    kwargs = dict(target_token_id=5, baseline_token_id=0, embeddings=model.wte)
    attention_only = explain(model, ids, **kwargs)
    everything = explain(model, ids, softmax_scope="all", **kwargs)
    custom = explain(model, ids, softmax_scope=lambda x, dim: x.dim() == 4, **kwargs)
    torch.testing.assert_close(custom, attention_only, rtol=0, atol=0)
    assert (everything - attention_only).abs().max() > 1e-4 * attention_only.abs().max()
    with pytest.raises(ValueError, match="softmax_scope"):
        GIM(model, softmax_scope="routers")


# --------------------------------------------------------------------------- HF families on the mode path


def _hf_family(family: str, attn: str):
    import transformers as t

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    ids = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    small = {
        "gpt_neo": (t.GPTNeoForCausalLM, t.GPTNeoConfig, dict(hidden_size=32, num_layers=2, num_heads=4, window_size=4,
                                                               attention_types=[[["global", "local"], 1]],
                                                               max_position_embeddings=64)),
        "openai_gpt": (t.OpenAIGPTLMHeadModel, t.OpenAIGPTConfig, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "mpt": (t.MptForCausalLM, t.MptConfig, dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2,
                                                     max_seq_len=64)),
        "bart": (t.BartForCausalLM, t.BartConfig, dict(d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                                        decoder_ffn_dim=64, encoder_layers=1, encoder_attention_heads=4,
                                                        encoder_ffn_dim=64, max_position_embeddings=64)),
        "biogpt": (t.BioGptForCausalLM, t.BioGptConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                              intermediate_size=64, max_position_embeddings=64)),
    }
    if family in small:
        cls, cfg_cls, extra = small[family]
        config = cfg_cls(**ids, **extra)
    elif family == "stablelm":
        config = t.StableLmConfig(**common, intermediate_size=48, num_key_value_heads=2, max_position_embeddings=64,
                                  use_qkv_bias=True, qk_layernorm=False)
        cls = t.StableLmForCausalLM
    elif family == "falcon":
        config = t.FalconConfig(**common, new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                bias=True)
        cls = t.FalconForCausalLM
    elif family == "falcon_alibi":
        config = t.FalconConfig(**common, alibi=True, multi_query=False, parallel_attn=False, bias=True)
        cls = t.FalconForCausalLM
    else:
        config = t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2)
        cls = t.BloomForCausalLM
    for key in list(config.to_dict()):
        if "dropout" in key or "pdrop" in key:
            setattr(config, key, 0.0)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and param.dim() == 1:
                param.normal_(0.0, 0.02)
            elif "norm" in name and param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight", "query_key_value.weight", "c_attn.weight",
                              "Wqkv.weight")):
                param.mul_(12.0)
    return model


class _ReferenceHFMode(TorchFunctionMode):
    """Reference rules for HF families without AttentionInterface: SDPA as eager maths, eager ops by hand.

    SDPA calls become :func:`_reference_sdpa`. Eager attention as these families write it: a last-dim
    softmax of a 3-D / 4-D tensor gets the temperature; a ``matmul`` / ``bmm`` whose first operand is those
    probabilities (or their cast / dropout) scales its second operand's gradient by v_scale; any other
    product of two grad-carrying 3-D / 4-D activations (``q @ k^T``, incl. Bloom's ``baddbmm``) gets the q /
    k scales on its operands.
    """

    def __init__(self) -> None:
        super().__init__()
        self.probs: list[torch.Tensor] = []

    def _is_probs(self, t) -> bool:
        return any(t is p for p in self.probs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            bound = {**dict(zip(names, args)), **kwargs}
            bound.pop("dropout_p", None)
            q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
            return _reference_sdpa(q, k, v, **bound)
        if func is torch.Tensor.baddbmm:
            kwargs = {**kwargs, "batch1": GradScale.apply(kwargs["batch1"], _REF["q_scale"]),
                      "batch2": GradScale.apply(kwargs["batch2"], _REF["k_scale"])}
        if func is F.softmax and args[0].dim() in (3, 4):
            if (args[1] if len(args) > 1 else kwargs.get("dim")) in (-1, args[0].dim() - 1):
                probs = TemperatureSoftmax.apply(args[0].to(kwargs.get("dtype") or args[0].dtype), _REF["temperature"])
                self.probs.append(probs)
                return probs
        out_is_probs = func in (torch.Tensor.to, F.dropout, torch.Tensor.view) and self._is_probs(args[0])
        if func in (torch.bmm, torch.matmul) and args[0].dim() >= 3 and args[0].requires_grad and args[1].requires_grad:
            if self._is_probs(args[0]):
                args = (args[0], GradScale.apply(args[1], _REF["v_scale"]))
            else:
                args = (GradScale.apply(args[0], _REF["q_scale"]), GradScale.apply(args[1], _REF["k_scale"]))
        out = func(*args, **kwargs)
        if out_is_probs:
            self.probs.append(out)
        return out


def reference_hf_attributions(model, ids, mask, settings, *, target_token_id: int, contrast: int) -> torch.Tensor:
    embed = model.get_input_embeddings()
    result = torch.zeros(ids.shape, dtype=torch.float64)
    _set_reference(settings)
    patched, handles = [], []
    for module in model.modules():
        forward = reference_hf_norm(module) if settings["freeze_norm"] else None
        if forward is not None:
            module.forward = forward
            patched.append(module)
        if isinstance(getattr(module, "gate_proj", None), nn.Linear):
            for name, key in (("gate_proj", "gate_scale"), ("up_proj", "up_scale")):
                if settings[key] is not None:
                    handles.append(getattr(module, name).register_forward_hook(_scale_output(settings[key])))
    try:
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            row_ids = ids[row][real][None]
            emb = embed(row_ids).detach().requires_grad_(True)
            base = embed(torch.zeros_like(row_ids)).detach()
            with _ReferenceHFMode():
                logits = model(inputs_embeds=emb, use_cache=False).logits[0, -1]
            (grad,) = torch.autograd.grad(logits[target_token_id] - logits[contrast], emb)
            result[row, real] = (grad.double() * (emb.double() - base.double())).sum(-1)[0]
    finally:
        for module in patched:
            del module.forward
        for handle in handles:
            handle.remove()
    return result


HF_CASES = [("stablelm", "sdpa"), ("stablelm", "eager"), ("falcon", "sdpa"), ("falcon_alibi", "sdpa"),
            ("bloom", "eager"), ("gpt_neo", "eager"), ("openai_gpt", "eager"), ("mpt", "eager"), ("bart", "sdpa"),
            ("biogpt", "sdpa")]
RIGHT_PADDED = {"bart"}  # its forward takes no position_ids: left padding would shift its positions


@pytest.mark.parametrize(("family", "attn"), HF_CASES)
def test_hf_families_outside_the_registry_match_reference(family, attn):
    model = _hf_family(family, attn)
    assert not GIM(model).uses_registry()
    ids = _ids(batch=3, seed=6)
    mask = torch.ones_like(ids)
    if family in RIGHT_PADDED:
        mask[1, -3:] = 0
        mask[2, -1:] = 0
    else:  # left padding
        mask[1, :3] = 0
        mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    got = explain(model, ids, attention_mask=mask, target_token_id=5, contrast_token_id=8, baseline_token_id=0)
    truth = reference_hf_attributions(_hf_family(family, attn).double(), ids, mask, DEFAULTS, target_token_id=5,
                                      contrast=8)
    want = reference_hf_attributions(model, ids, mask, DEFAULTS, target_token_id=5, contrast=8)
    scale = truth.abs().max().item()
    err, err_ref = (got.double() - truth).abs().max().item(), (want - truth).abs().max().item()
    assert err <= 3 * err_ref + 2e-5 * scale, (err, err_ref, scale)
    assert (got[mask == 0] == 0).all()
    plain = reference_hf_attributions(model, ids, mask, OFF, target_token_id=5, contrast=8)
    assert (plain - want).abs().max() > 1e-3 * scale, "the rules must visibly change the attribution"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_registry_and_function_mode_paths_agree(attn):
    from reference_gim import build_model

    model = build_model("llama", attn=attn)
    ids = _ids(batch=2, seed=9).clamp(max=VOCAB - 1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, target_token_id=5, contrast_token_id=8, baseline_token_id=0)
    registry = explain(model, ids, **kwargs)
    assert model.config._attn_implementation == attn
    mode = explain(model, ids, integration="function_mode", **kwargs)
    assert model.config._attn_implementation == attn
    torch.testing.assert_close(mode, registry, rtol=0, atol=1e-5 * registry.abs().max().item())


class Wrapper(nn.Module):
    """A plain module around a transformers model (no .config): served by the mode path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(input_ids=ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("attn", ["gim_fused", "eager"])
def test_plain_wrapper_around_an_hf_model_matches_the_registry_path(attn):
    from reference_gim import build_model

    inner = build_model("qwen2", attn=attn)
    ids = _ids(batch=2, seed=15)
    kwargs = dict(target_token_id=5, contrast_token_id=8, baseline_token_id=0)
    want = explain(inner, ids, **kwargs)
    wrapper = Wrapper(inner).eval()
    assert not GIM(wrapper).uses_registry()
    got = explain(wrapper, ids, embeddings=inner.get_input_embeddings(), **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


# --------------------------------------------------------------------------- threads, compile, state


def _plain_grad(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    emb = model.wte(ids).detach().requires_grad_(True)
    logits, _ = model(ids, embeds=emb)
    (grad,) = torch.autograd.grad(logits[:, -1, 3].sum(), emb)
    return grad


def test_thread_outside_gim_gets_plain_gradients_while_another_runs_gim():
    model = _build(TinyLlama, "sdpa", seed=7)  # hand-written RMSNorm (module patch) + SwiGLU (hooks) + SDPA
    ids = _ids(batch=2, seed=1)
    plain_expected = _plain_grad(model, ids)
    with GIM(model):
        gim_expected = _plain_grad(model, ids)
    assert (gim_expected - plain_expected).abs().max() > 1e-3 * plain_expected.abs().max()
    barrier, results, errors = threading.Barrier(2), {}, []

    def run(name: str, use_gim: bool) -> None:
        try:
            for step in range(3):
                barrier.wait()
                if use_gim:
                    with GIM(model):
                        barrier.wait()  # the other thread runs while this one is inside GIM
                        results[(name, step)] = _plain_grad(model, ids)
                else:
                    barrier.wait()
                    results[(name, step)] = _plain_grad(model, ids)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=("gim", True)), threading.Thread(target=run, args=("plain", False))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for step in range(3):
        assert torch.equal(results[("plain", step)], plain_expected)
        torch.testing.assert_close(results[("gim", step)], gim_expected, rtol=0, atol=1e-6)


def test_concurrent_explain_calls_on_one_plain_model():
    model = _build(TinyGPT, "eager", seed=8)
    ids = _ids(batch=2, seed=16)
    settings = {"gim": DEFAULTS, "plain": OFF}
    kwargs = dict(target_token_id=3, baseline_token_id=0, embeddings=model.wte)
    expected = {name: explain(model, ids, **kwargs, **rules) for name, rules in settings.items()}
    barrier, results, errors = threading.Barrier(2), {}, []

    def run(name: str) -> None:
        try:
            for step in range(3):
                barrier.wait()
                results[(name, step)] = explain(model, ids, **kwargs, **settings[name])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(name,)) for name in settings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for (name, _), got in results.items():
        torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-6)


def test_nothing_left_active_after_the_block_or_an_error():
    model = _build(TinyLlama, "sdpa")
    before = {name: sorted(m.__dict__.get("_forward_hooks", {})) for name, m in model.named_modules()}
    owned = {name for name, m in model.named_modules() if "forward" in m.__dict__}
    with pytest.raises(KeyError):
        with GIM(model):
            assert torch._C._get_function_mode_stack_len() if hasattr(torch._C, "_get_function_mode_stack_len") \
                else True
            raise KeyError("boom")
    assert not torch.overrides._get_current_function_mode_stack()
    after = {name: sorted(m.__dict__.get("_forward_hooks", {})) for name, m in model.named_modules()}
    assert before == after and owned == {name for name, m in model.named_modules() if "forward" in m.__dict__}


def test_torch_compile_inside_the_mode_works_or_is_a_clear_error():
    model = _build(TinyGPT, "sdpa", seed=3)
    ids = _ids(batch=1, seed=4)
    want = explain(model, ids, target_token_id=2, baseline_token_id=0, embeddings=model.wte)
    strict = torch.compile(_build(TinyGPT, "sdpa", seed=3).h[0].attn, backend="eager", fullgraph=True)
    x = torch.randn(1, 5, WIDTH, requires_grad=True)
    with GIM(strict), pytest.raises(Exception, match="runs eagerly"):
        strict(x)
    model.h[1].attn = torch.compile(model.h[1].attn, backend="eager")  # dynamo falls back to eager inside GIM
    got = explain(model, ids, target_token_id=2, baseline_token_id=0, embeddings=model.wte)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


# --------------------------------------------------------------------------- what is refused


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.ln, self.out = nn.Embedding(VOCAB, WIDTH), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids):
        return self.out(self.ln(self.embed(ids)))


class MHAModel(NoAttention):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, ids):
        x = self.embed(ids)
        return self.out(self.ln(x + self.mha(x, x, x, need_weights=False)[0]))


class W1W3(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(WIDTH, 48), nn.Linear(48, WIDTH), nn.Linear(WIDTH, 48)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class OddNorm(nn.Module):  # a norm class no known variant reproduces
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x / (x.abs().mean(-1, keepdim=True) + 1e-5) * self.weight


def test_model_without_attention_is_an_error_unless_the_attention_rules_are_off():
    model = NoAttention().eval()
    ids = _ids(batch=1)
    with pytest.raises(TypeError, match="no attention op"):
        explain(model, ids, target_token_id=1, baseline_token_id=0)
    off = {**OFF, "freeze_norm": True}
    got = explain(model, ids, target_token_id=1, baseline_token_id=0, **off)
    assert got.abs().max() > 0


def test_refused_models_name_what_is_missing():
    ids = _ids(batch=1)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        explain(MHAModel().eval(), ids, target_token_id=1, baseline_token_id=0)
    gpt = _build(TinyGPT, "sdpa")
    with pytest.raises(TypeError, match=r"get_input_embeddings\(\).*wte, wpe"):
        explain(gpt, ids, target_token_id=1, baseline_token_id=0)
    gpt.h[0].mlp = W1W3()
    with pytest.raises(TypeError, match="W1W3"):
        explain(gpt, ids, target_token_id=1, baseline_token_id=0, embeddings=gpt.wte)
    got = explain(gpt, ids, target_token_id=1, baseline_token_id=0, embeddings=gpt.wte, gate_scale=None,
                  up_scale=None)
    assert torch.isfinite(got).all()
    gpt.h[1].ln_2 = OddNorm(WIDTH)
    with pytest.raises(TypeError, match="OddNorm"):
        explain(gpt, ids, target_token_id=1, baseline_token_id=0, embeddings=gpt.wte, gate_scale=None,
                up_scale=None)
    with pytest.raises(ValueError, match="head_mask"):
        explain(_build(TinyLlama, "sdpa"), ids, target_token_id=1, baseline_token_id=0,
                head_mask=torch.ones(2, HEADS))


def test_hand_written_attention_without_a_visible_qk_product_is_an_error():
    class Odd(TinyGPT):
        def forward(self, idx, targets=None):
            x = self.wte(idx)
            scores = (x[:, None, :, None, :] * x[:, None, None, :, :]).sum(-1)  # no matmul behind the scores
            probs = F.softmax(scores, dim=-1)
            return self.lm_head(probs[:, 0] @ x), None

    model = Odd("eager").eval()
    with pytest.raises(TypeError, match="q @ k"):
        explain(model, _ids(batch=1), target_token_id=1, baseline_token_id=0, embeddings=model.wte)


def test_attention_probabilities_without_a_pv_product_are_an_error_while_v_scale_is_on():
    class NoPV(TinyGPT):
        def forward(self, idx, targets=None):
            x = self.wte(idx)[:, None]  # (batch, 1 head, seq, width)
            probs = F.softmax(x @ x.transpose(-1, -2), dim=-1)
            y = (probs.unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)  # P @ V written without a product
            return self.lm_head(y[:, 0]), None

    model = NoPV("eager").eval()
    kwargs = dict(target_token_id=1, baseline_token_id=0, embeddings=model.wte, gate_scale=None, up_scale=None)
    with pytest.raises(TypeError, match="P @ V"):
        explain(model, _ids(batch=1), **kwargs)
    assert torch.isfinite(explain(model, _ids(batch=1), v_scale=None, **kwargs)).all()
