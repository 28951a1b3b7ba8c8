"""Norm variants GIM recognises by comparing forwards: LayerNorm subclasses with their own forward,
``weight + 1`` LayerNorm / RMSNorm, centred LayerNorms without bias (OLMo's, hard-coded eps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

from fastgim.norm_patching import norm_spec, patch_norms
from fastgim.settings import GIMSettings, use_settings

HIDDEN = 97


class FP32LayerNorm(nn.LayerNorm):
    """Computes in float32 whatever the input dtype (a subclass overriding forward)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class OffsetLayerNorm(nn.LayerNorm):
    """``weight + 1`` LayerNorm (weights stored as offsets from 1)."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class OffsetRMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class NoBiasLayerNorm(nn.Module):
    """A centred LayerNorm with a weight, no bias and its eps in the code (no attribute)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, 1e-6)


class ScaledLayerNorm(nn.LayerNorm):
    """No variant reproduces this (an extra factor): must stay an error naming the class."""

    def forward(self, x):
        return super().forward(x) * 1.5


def _norm(cls: type[nn.Module], dtype: torch.dtype) -> nn.Module:
    module = cls(HIDDEN)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return module.to(dtype)


def _weight(module: nn.Module, offset: float) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return None if weight is None else weight.double() + offset


def _frozen_reference(module: nn.Module, x: torch.Tensor, kind: str, eps: float, offset: float) -> torch.Tensor:
    """float64 output of the norm with its statistic (std / rms) detached."""
    x = x.double()
    weight, bias = _weight(module, offset), getattr(module, "bias", None)
    if kind == "layer":
        centred = x - x.mean(-1, keepdim=True)
        y = centred / torch.sqrt(centred.detach().pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = x / torch.sqrt(x.detach().pow(2).mean(-1, keepdim=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias.double()


VARIANTS = [
    (FP32LayerNorm, "layer", 1e-5, 0.0),
    (OffsetLayerNorm, "layer", 1e-5, 1.0),
    (OffsetRMSNorm, "rms", 1e-6, 1.0),
    (NoBiasLayerNorm, "layer", 1e-6, 0.0),
    (OlmoLayerNorm, "layer", 1e-5, 0.0),
]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("cls", "kind", "eps", "offset"), VARIANTS, ids=[v[0].__name__ for v in VARIANTS])
def test_variant_is_recognised_and_frozen_exactly(cls, kind, eps, offset, dtype):
    module = _norm(cls, dtype)
    spec = norm_spec(module)
    assert spec.kind == kind
    x = (torch.randn(2, 5, HIDDEN) * 2 + 0.3).to(dtype).requires_grad_(True)
    expected = module(x)
    dy = torch.randn_like(expected)
    holder = nn.ModuleDict({"norm": module})
    undo = patch_norms(holder)
    try:
        with use_settings(GIMSettings()):
            got = module(x)
            (grad,) = torch.autograd.grad(got, x, dy)
    finally:
        undo()
    assert "forward" not in module.__dict__
    assert torch.equal(got, expected), "the frozen forward must equal the module's own bit for bit"
    x64 = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(_frozen_reference(module, x64, kind, eps, offset), x64, dy.double())
    scale = want.abs().max().item()
    torch.testing.assert_close(grad.double(), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


def test_probing_fp32_weights_does_not_decide_for_bf16_weights():
    """An fp32-computing LayerNorm: with fp32 weights any cast matches; with bf16 weights only fp32 does."""
    norm_spec(_norm(FP32LayerNorm, torch.float32))
    module = _norm(FP32LayerNorm, torch.bfloat16)
    x = torch.randn(4, HIDDEN).to(torch.bfloat16)
    undo = patch_norms(nn.ModuleDict({"norm": module}))
    try:
        with use_settings(GIMSettings()):
            got = module(x)
    finally:
        undo()
    assert torch.equal(got, FP32LayerNorm.forward(module, x))


def test_an_unreproducible_layernorm_subclass_is_an_error_naming_it():
    with pytest.raises(TypeError, match="ScaledLayerNorm"):
        norm_spec(_norm(ScaledLayerNorm, torch.float32))
