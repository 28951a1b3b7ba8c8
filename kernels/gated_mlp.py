"""Triton gated-MLP activation ``act(gate) * up`` (SwiGLU / GeGLU) with GIM's scaled backward.

Elementwise over the flattened tensors. The forward rounds ``act(gate)`` to the input dtype before the
multiply, as PyTorch's two separate ops do. The backward computes in fp32:
``dgate = dout * up * act'(gate) * gate_scale``, ``dup = dout * act(gate) * up_scale``.
Activations (``ACT``): 0 = SiLU, 1 = tanh-GELU (``1 + tanh(u)`` written as ``2 * sigmoid(2u)``, exact
algebra without cancellation and without libdevice), 2 = erf-GELU, 3 = transformers' NewGELU (the
tanh formula; same function as 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgim.kernels.launch import device_guard

ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1, "gelu": 2, "gelu_new": 3}
BLOCK = 2048
NUM_WARPS = 8
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_KAPPA = tl.constexpr(0.044715)
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 0:
        return z / (1.0 + tl.exp(-z))
    if ACT == 2:
        return 0.5 * z * (1.0 + tl.erf(z * _SQRT_HALF))
    u = _SQRT_2_OVER_PI * (z + _KAPPA * z * z * z)
    return z / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _act_fwd_and_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-z))
        return z * s, s * (1.0 + z * (1.0 - s))
    if ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(z * _SQRT_HALF))
        return z * cdf, cdf + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    u = _SQRT_2_OVER_PI * (z + _KAPPA * z * z * z)
    s = 1.0 / (1.0 + tl.exp(-2.0 * u))
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _KAPPA * z * z)
    return z * s, s + z * 2.0 * s * (1.0 - s) * du


@triton.jit
def _gated_fwd_kernel(GATE, UP, OUT, numel, ACT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    act = _act_fwd(g, ACT).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (act * up).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, numel, gate_scale, up_scale,
                      ACT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    d = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_fwd_and_grad(g, ACT)
    tl.store(DGATE + offs, (d * up * dact * gate_scale).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (d * act * up_scale).to(DUP.dtype.element_ty), mask=mask)


def _check(gate: torch.Tensor, up: torch.Tensor, activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if gate.shape != up.shape or not gate.is_contiguous() or not up.is_contiguous():
        raise ValueError(
            f"gate and up must be contiguous and of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}"
        )
    return ACTIVATIONS[activation]


def gated_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for contiguous ``gate`` / ``up`` of one shape; result in gate's dtype."""
    act = _check(gate, up, activation)
    out = torch.empty_like(gate)
    numel = gate.numel()
    if numel:
        with device_guard(gate):
            _gated_fwd_kernel[(triton.cdiv(numel, BLOCK),)](gate, up, out, numel, ACT=act, BLOCK_SIZE=BLOCK,
                                                            num_warps=NUM_WARPS)
    return out


def gated_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str, gate_scale: float, up_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` of ``act(gate) * up``, scaled by ``gate_scale`` / ``up_scale``; dtypes of the inputs."""
    act = _check(gate, up, activation)
    if dout.shape != gate.shape or not dout.is_contiguous():
        raise ValueError(f"dout must be contiguous with shape {tuple(gate.shape)}, got {tuple(dout.shape)}")
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    numel = gate.numel()
    if numel:
        with device_guard(gate):
            _gated_bwd_kernel[(triton.cdiv(numel, BLOCK),)](
                dout, gate, up, dgate, dup, numel, float(gate_scale), float(up_scale), ACT=act, BLOCK_SIZE=BLOCK,
                num_warps=NUM_WARPS,
            )
    return dgate, dup
