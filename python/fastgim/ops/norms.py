"""Norms and the gated-MLP activation with GIM's backward: ``rms_norm``, ``layer_norm``, ``gated_activation``.

Forward outputs equal the Hugging Face modules' own forwards (bit for bit on the ``torch`` path);
only the backward changes under GIM:

* ``frozen=True``: the statistic is a constant in the backward. RMSNorm ``dx = dy * w_eff * rstd``;
  LayerNorm keeps the mean's gradient and detaches the std: ``dx = (g - mean(g)) * rstd`` with
  ``g = dy * w``. Weight and bias gradients are the ordinary ones.
* ``gated_activation(gate, up) = act(gate) * up``; its backward multiplies the gradient into ``gate`` by
  ``gate_scale`` and the gradient into ``up`` by ``up_scale``.

Layering: backends (``torch`` here; ``triton`` in ``fastgim.kernels``; ``cuda`` in ``fastgim._C`` via
:mod:`fastgim.ops.cuda_ext`) -> ``torch.library.custom_op`` ops ``fastgim::rms_norm_forward`` etc. with
fake impls -> autograd -> the public functions. ``$FASTGIM_NORM_BACKEND`` (``torch``, ``triton``, ``cuda``)
forces a backend; by default CUDA tensors take the preferred available GPU backend (``GPU_PREFERENCE``) and other
devices ``torch``.

Casting orders (``cast=``), each the model family's own forward, with ``x32 = x.float()``,
``n = x32 * rsqrt(mean(x32^2) + eps)``:

* ``"llama"`` (Llama, Mistral, Mixtral, Qwen2/3, Phi-3, Granite, SmolLM3, DeepSeek-V3...):
  ``w_eff * n.to(x.dtype)`` with ``w_eff = weight (+ weight_offset)`` in the weight's dtype; the
  result has the promoted dtype of weight and x;
* ``"gemma"`` (Gemma 1/2/3 with ``weight_offset=1``; Gemma-3n with 0): ``(n * (offset + weight.float()))
  .to(x.dtype)``;
* ``"olmo2"`` (OLMo-2/3): ``(w_eff * n).to(x.dtype)``.

LayerNorm casts: ``"torch"`` (``nn.LayerNorm``: GPT-2, BERT...; ``F.layer_norm`` in the input dtype),
``"fp32"`` (OLMo: ``F.layer_norm`` on ``x.float()`` with fp32 weight/bias, cast back), ``"cohere"``
(Cohere: explicit fp32 formula, ``weight.float() * x_hat``, cast back).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

NORM_BACKENDS = ("torch", "triton", "cuda")
RMS_CASTS = ("llama", "gemma", "olmo2")
LAYER_NORM_CASTS = ("torch", "fp32", "cohere")
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_tanh", "gelu_new")

# --------------------------------------------------------------------------- backend choice


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401

        import fastgim.kernels.rms_norm  # noqa: F401
    except ImportError:
        return False
    return True


def _backend_available(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        # check the device first: importing the kernels decides once whether they are interpreted
        return (device.type == "cuda" or (device.type == "cpu" and _interpreter_on())) and _triton_importable()
    if name == "cuda":
        from fastgim.ops import cuda_ext

        return device.type == "cuda" and cuda_ext.is_available()
    raise ValueError(f"unknown norm backend {name!r}; choose one of {', '.join(NORM_BACKENDS)}")


# The order in which the GPU backends are preferred when both are available. Not yet measured: no GPU
# was available when this was written, so Triton (verified under the interpreter) comes first and the
# CUDA extension (compiled, never run) is used only when asked for or when Triton is missing -- which
# also keeps its one-time JIT build from starting unannounced. Run benchmarks/norms.py and the gpu tests
# on the target GPU and reorder if the extension wins.
GPU_PREFERENCE = ("triton", "cuda")


def resolve_norm_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend that runs on ``device``: ``requested``, else ``$FASTGIM_NORM_BACKEND``, else the fastest.

    Raises ValueError for an unknown name and RuntimeError if the named backend cannot run on ``device``.
    """
    name = requested or os.environ.get("FASTGIM_NORM_BACKEND") or None
    if name is not None:
        if name not in NORM_BACKENDS:
            raise ValueError(f"unknown norm backend {name!r}; choose one of {', '.join(NORM_BACKENDS)}")
        if not _backend_available(name, device):
            hint = " (on CPU it needs TRITON_INTERPRET=1)" if name == "triton" else ""
            raise RuntimeError(
                f"norm backend {name!r} is not available for {device.type} tensors{hint}; "
                f"unset FASTGIM_NORM_BACKEND or use 'torch'"
            )
        return name
    if device.type == "cuda":
        for candidate in GPU_PREFERENCE:
            if _backend_available(candidate, device):
                return candidate
    return "torch"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous ``(rows, hidden)`` matrix."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# --------------------------------------------------------------------------- torch path: RMSNorm


def _rms_out_dtype(x: torch.Tensor, weight: torch.Tensor | None, cast: str) -> torch.dtype:
    if cast == "llama" and weight is not None:
        return torch.promote_types(weight.dtype, x.dtype)
    return x.dtype


def _rms_weight_eff(weight: torch.Tensor, weight_offset: float, cast: str) -> torch.Tensor:
    """``w_eff`` in the dtype the model's forward uses (fp32 for gemma, the weight's dtype otherwise)."""
    if cast == "gemma":
        return weight_offset + weight.float()
    return weight if weight_offset == 0.0 else weight + weight_offset


def _torch_rms_forward(x, weight, eps, weight_offset, cast):
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = x32 * rstd
    if weight is None:
        out = normed.to(x.dtype)
    elif cast == "llama":
        weight_eff, normed_x = _rms_weight_eff(weight, weight_offset, cast), normed.to(x.dtype)
        if normed_x.dtype == torch.promote_types(weight_eff.dtype, normed_x.dtype):
            out = normed_x.mul_(weight_eff)  # a fresh tensor: same values as weight * normed, one allocation less
        else:
            out = weight_eff * normed_x
    else:  # gemma, olmo2: multiply in fp32, then cast
        out = normed.mul_(_rms_weight_eff(weight, weight_offset, cast)).to(x.dtype)
    return out, rstd.squeeze(-1)


def _torch_rms_backward(dy, x, weight, rstd, weight_offset, cast, frozen, want_dweight=True):
    r = rstd.unsqueeze(-1)
    dy32 = dy.to(torch.float32)
    want_dweight = weight is not None and want_dweight
    normed = x.to(torch.float32) * r if want_dweight or not frozen else None
    g = dy32 if weight is None else dy32 * _rms_weight_eff(weight, weight_offset, cast).to(torch.float32)
    if not frozen:
        dx = r * (g - normed * (g * normed).mean(-1, keepdim=True))
    else:
        dx = g * r if g is dy32 else g.mul_(r)  # g is a fresh tensor unless it is dy itself
    dw = None
    if want_dweight:
        seen = normed.to(x.dtype).to(torch.float32) if cast == "llama" else normed
        dw = (dy32 * seen).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw


# --------------------------------------------------------------------------- torch path: LayerNorm


def _ln_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.to(torch.float32)
    mean = x32.mean(-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(-1, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def _torch_ln_forward(x, weight, bias, eps, cast):
    shape = (x.shape[-1],)
    mean, rstd = _ln_stats(x, eps)
    if cast == "torch":
        out = F.layer_norm(x, shape, weight, bias, eps)
    elif cast == "fp32":
        w32 = None if weight is None else weight.float()
        b32 = None if bias is None else bias.float()
        out = F.layer_norm(x.to(torch.float32), shape, w32, b32, eps).to(x.dtype)
    else:  # cohere
        out = (x.to(torch.float32) - mean) * rstd
        if weight is not None:
            out = weight.to(torch.float32) * out
        if bias is not None:
            out = out + bias.to(torch.float32)
        out = out.to(x.dtype)
    return out, mean.squeeze(-1), rstd.squeeze(-1)


def _torch_ln_backward(dy, x, weight, bias, mean, rstd, frozen, want_dweight=True, want_dbias=True):
    r = rstd.unsqueeze(-1)
    xhat = (x.to(torch.float32) - mean.unsqueeze(-1)) * r
    dy32 = dy.to(torch.float32)
    g = dy32 if weight is None else dy32 * weight.to(torch.float32)
    g_centred = g - g.mean(-1, keepdim=True)
    if frozen:
        dx = g_centred * r
    else:
        dx = r * (g_centred - xhat * (g * xhat).mean(-1, keepdim=True))
    hidden = x.shape[-1]
    dw = None if weight is None or not want_dweight else (dy32 * xhat).reshape(-1, hidden).sum(0).to(weight.dtype)
    db = None if bias is None or not want_dbias else dy32.reshape(-1, hidden).sum(0).to(bias.dtype)
    return dx.to(x.dtype), dw, db


# --------------------------------------------------------------------------- torch path: gated activation

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _act(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(gate)
    if activation in ("gelu_pytorch_tanh", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh")
    if activation == "gelu":
        return F.gelu(gate)
    # gelu_new: transformers' NewGELUActivation, written out
    return 0.5 * gate * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (gate + 0.044715 * torch.pow(gate, 3.0))))


def _act_and_grad32(gate: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(gate)`` and ``act'(gate)`` in float32 (float64 for float64 input)."""
    z = gate.to(torch.promote_types(gate.dtype, torch.float32))
    if activation in ("silu", "swish"):
        s = torch.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return z * cdf, cdf + z * pdf
    inner = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
    t = torch.tanh(inner)
    dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
    return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner


def _torch_gated_forward(gate, up, activation):
    act = _act(gate, activation)
    return act.mul_(up) if act.dtype == up.dtype else act * up


def _silu_gated_backward(dout, gate, up, gate_scale, up_scale):
    """SiLU in float32 / float64: two new tensors and one pass each, no score-sized temporaries."""
    dgate = torch.mul(dout, up)
    torch.ops.aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)
    dup = F.silu(gate).mul_(dout)
    if gate_scale != 1.0:
        dgate.mul_(gate_scale)
    if up_scale != 1.0:
        dup.mul_(up_scale)
    return dgate, dup


def _torch_gated_backward(dout, gate, up, activation, gate_scale, up_scale):
    if (activation in ("silu", "swish") and dout.dtype == gate.dtype == up.dtype
            and gate.dtype in (torch.float32, torch.float64)):
        return _silu_gated_backward(dout, gate, up, gate_scale, up_scale)
    act, dact = _act_and_grad32(gate, activation)
    d32 = dout.to(act.dtype)
    dgate = (d32 * up.to(act.dtype) * dact) * gate_scale
    dup = (d32 * act) * up_scale
    return dgate.to(gate.dtype), dup.to(up.dtype)


# --------------------------------------------------------------------------- backend dispatch


def _gpu_module(kind: str, backend: str):
    if backend == "cuda":
        from fastgim.ops import cuda_ext

        return cuda_ext
    if kind == "rms":
        from fastgim.kernels import rms_norm as module
    elif kind == "ln":
        from fastgim.kernels import layer_norm as module
    else:
        from fastgim.kernels import gated_mlp as module
    return module


def _rms_module(x, weight, cast, backend):
    """The RMSNorm kernel module; Llama's dtype promotion (weight dtype wider than x) runs on Triton."""
    if backend == "cuda":
        from fastgim.ops import cuda_ext

        if not cuda_ext.supports_rms(x, weight, cast):
            backend = "triton"
    return _gpu_module("rms", backend)


def _rms_forward_impl(x, weight, eps, weight_offset, cast, backend):
    if backend == "torch":
        return _torch_rms_forward(x, weight, eps, weight_offset, cast)
    out, rstd = _rms_module(x, weight, cast, backend).rms_norm_forward(_rows(x), _opt(weight), eps, weight_offset, cast)
    return out.view(*x.shape[:-1], out.shape[-1]), rstd.view(x.shape[:-1])


def _rms_backward_impl(dy, x, weight, rstd, weight_offset, cast, frozen, want_dweight, backend):
    if backend == "torch":
        return _torch_rms_backward(dy, x, weight, rstd, weight_offset, cast, frozen, want_dweight)
    dx, dw = _rms_module(x, weight, cast, backend).rms_norm_backward(
        _rows(dy), _rows(x), _opt(weight), rstd.reshape(-1).contiguous(), weight_offset, cast, frozen,
        want_dweight,
    )
    return dx.view(x.shape), dw


def _ln_forward_impl(x, weight, bias, eps, cast, backend):
    if backend == "torch":
        return _torch_ln_forward(x, weight, bias, eps, cast)
    out, mean, rstd = _gpu_module("ln", backend).layer_norm_forward(_rows(x), _opt(weight), _opt(bias), eps, cast)
    return out.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def _ln_backward_impl(dy, x, weight, bias, mean, rstd, frozen, want_dweight, want_dbias, backend):
    if backend == "torch":
        return _torch_ln_backward(dy, x, weight, bias, mean, rstd, frozen, want_dweight, want_dbias)
    dx, dw, db = _gpu_module("ln", backend).layer_norm_backward(
        _rows(dy), _rows(x), _opt(weight), _opt(bias), mean.reshape(-1).contiguous(),
        rstd.reshape(-1).contiguous(), frozen, want_dweight, want_dbias,
    )
    return dx.view(x.shape), dw, db


def _gated_backend(backend: str) -> str:
    return "triton" if backend == "cuda" else backend  # the CUDA extension implements the norms only


def _gated_forward_impl(gate, up, activation, backend):
    if _gated_backend(backend) == "torch":
        return _torch_gated_forward(gate, up, activation)
    out = _gpu_module("gated", "triton").gated_forward(gate.contiguous(), up.contiguous(), activation)
    return out


def _gated_backward_impl(dout, gate, up, activation, gate_scale, up_scale, backend):
    if _gated_backend(backend) == "torch":
        return _torch_gated_backward(dout, gate, up, activation, gate_scale, up_scale)
    return _gpu_module("gated", "triton").gated_backward(
        dout.contiguous(), gate.contiguous(), up.contiguous(), activation, gate_scale, up_scale
    )


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


# --------------------------------------------------------------------------- custom ops: RMSNorm


@torch.library.custom_op("fastgim::rms_norm_forward", mutates_args=(), device_types=None)
def _rms_norm_forward_op(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float, cast: str, frozen: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, rstd)``; ``rstd`` is float32 of shape ``x.shape[:-1]``."""
    return _rms_forward_impl(x, weight, eps, weight_offset, cast, backend)


@_rms_norm_forward_op.register_fake
def _rms_norm_forward_fake(x, weight, eps, weight_offset, cast, frozen, backend):
    out = x.new_empty(x.shape, dtype=_rms_out_dtype(x, weight, cast))
    return out, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastgim::rms_norm_backward", mutates_args=(), device_types=None)
def _rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, weight_offset: float,
    cast: str, frozen: bool, want_dweight: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dweight)``; ``dweight`` is empty when ``weight`` is None or not wanted."""
    dx, dw = _rms_backward_impl(dy, x, weight, rstd, weight_offset, cast, frozen, want_dweight, backend)
    return dx, _or_empty(dw, x)


@_rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(dy, x, weight, rstd, weight_offset, cast, frozen, want_dweight, backend):
    return torch.empty_like(x), (torch.empty_like(weight) if weight is not None and want_dweight else x.new_empty(0))


def _rms_setup_context(ctx, inputs, output):
    x, weight, _eps, weight_offset, cast, frozen, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.options = (weight_offset, cast, frozen, backend)


def _rms_backward(ctx, dout, _drstd):
    x, weight, rstd = ctx.saved_tensors
    weight_offset, cast, frozen, backend = ctx.options
    want_dweight = weight is not None and ctx.needs_input_grad[1]
    dx, dw = _rms_norm_backward_op(dout, x, weight, rstd, weight_offset, cast, frozen, want_dweight, backend)
    return dx, (dw if want_dweight else None), None, None, None, None, None


_rms_norm_forward_op.register_autograd(_rms_backward, setup_context=_rms_setup_context)


# --------------------------------------------------------------------------- custom ops: LayerNorm


@torch.library.custom_op("fastgim::layer_norm_forward", mutates_args=(), device_types=None)
def _layer_norm_forward_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, cast: str,
    frozen: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, mean, rstd)``; the statistics are float32 of shape ``x.shape[:-1]``."""
    return _ln_forward_impl(x, weight, bias, eps, cast, backend)


@_layer_norm_forward_op.register_fake
def _layer_norm_forward_fake(x, weight, bias, eps, cast, frozen, backend):
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat)


@torch.library.custom_op("fastgim::layer_norm_backward", mutates_args=(), device_types=None)
def _layer_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, frozen: bool, want_dweight: bool, want_dbias: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dweight, dbias)``; parameter gradients are empty for absent or unwanted parameters."""
    dx, dw, db = _ln_backward_impl(dy, x, weight, bias, mean, rstd, frozen, want_dweight, want_dbias, backend)
    return dx, _or_empty(dw, x), _or_empty(db, x)


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(dy, x, weight, bias, mean, rstd, frozen, want_dweight, want_dbias, backend):
    dw = torch.empty_like(weight) if weight is not None and want_dweight else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None and want_dbias else x.new_empty(0)
    return torch.empty_like(x), dw, db


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, _eps, _cast, frozen, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.options = (frozen, backend)


def _ln_backward(ctx, dout, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    frozen, backend = ctx.options
    want_dw = weight is not None and ctx.needs_input_grad[1]
    want_db = bias is not None and ctx.needs_input_grad[2]
    dx, dw, db = _layer_norm_backward_op(dout, x, weight, bias, mean, rstd, frozen, want_dw, want_db, backend)
    return dx, (dw if want_dw else None), (db if want_db else None), None, None, None, None


_layer_norm_forward_op.register_autograd(_ln_backward, setup_context=_ln_setup_context)


# --------------------------------------------------------------------------- custom ops: gated activation


@torch.library.custom_op("fastgim::gated_activation_forward", mutates_args=(), device_types=None)
def _gated_forward_op(
    gate: torch.Tensor, up: torch.Tensor, activation: str, gate_scale: float, up_scale: float, backend: str
) -> torch.Tensor:
    """``act(gate) * up``; the scales are carried only so that autograd hands them to the backward."""
    return _gated_forward_impl(gate, up, activation, backend)


@_gated_forward_op.register_fake
def _gated_forward_fake(gate, up, activation, gate_scale, up_scale, backend):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("fastgim::gated_activation_backward", mutates_args=(), device_types=None)
def _gated_backward_op(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str, gate_scale: float,
    up_scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(dgate * gate_scale, dup * up_scale)``."""
    return _gated_backward_impl(dout, gate, up, activation, gate_scale, up_scale, backend)


@_gated_backward_op.register_fake
def _gated_backward_fake(dout, gate, up, activation, gate_scale, up_scale, backend):
    return torch.empty_like(gate), torch.empty_like(up)


def _gated_setup_context(ctx, inputs, output):
    gate, up, activation, gate_scale, up_scale, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.options = (activation, gate_scale, up_scale, backend)


def _gated_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = _gated_backward_op(dout, gate, up, *ctx.options)
    return dgate, dup, None, None, None, None


_gated_forward_op.register_autograd(_gated_backward, setup_context=_gated_setup_context)


# --------------------------------------------------------------------------- public functions


def _check_param(name: str, p: torch.Tensor | None, x: torch.Tensor) -> None:
    if p is None:
        return
    if p.dim() != 1 or p.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{name} must be 1-D with the hidden size {x.shape[-1]} (the last dim of x), got shape {tuple(p.shape)}"
        )
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}; move them to one device")
    if not p.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {p.dtype}")


def _check_x(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{what} must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {x.dtype}")


def _check_eps(eps: float) -> float:
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    weight_offset: float = 0.0,
    cast: str = "llama",
    frozen: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim, equal to the model family's own module; GIM's frozen backward on request.

    Args:
        x: ``(..., hidden)`` float tensor (fp32 / fp16 / bf16; fp64 on the ``torch`` backend); any strides.
        weight: ``(hidden,)`` or None for a weightless norm.
        eps: added to ``mean(x^2)`` before the rsqrt.
        weight_offset: ``w_eff = weight_offset + weight`` (1.0 for Gemma's ``1 + w``).
        cast: ``"llama"``, ``"gemma"`` or ``"olmo2"``: the casting order of the family (module docstring).
        frozen: GIM's frozen statistic: ``dx = dy * w_eff * rstd`` (rstd a constant); False gives the
            ordinary gradient. The weight gradient is the ordinary one either way.
        backend: ``"torch"``, ``"triton"`` or ``"cuda"``; default ``$FASTGIM_NORM_BACKEND`` or the preferred one.

    Returns:
        ``x.shape``; dtype of ``x`` (``"llama"`` with a weight: promoted dtype of weight and x, as the module).
    """
    _check_x(x, "x")
    _check_param("weight", weight, x)
    if cast not in RMS_CASTS:
        raise ValueError(f"unknown rms_norm cast {cast!r}; choose one of {', '.join(RMS_CASTS)}")
    if weight is None and weight_offset != 0.0:
        raise ValueError("weight_offset needs a weight; pass weight=None only with weight_offset=0")
    name = resolve_norm_backend(x.device, backend)
    out, _ = _rms_norm_forward_op(x, weight, _check_eps(eps), float(weight_offset), cast, bool(frozen), name)
    return out


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    frozen: bool = False,
    cast: str = "torch",
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim, equal to ``nn.LayerNorm`` (or OLMo's / Cohere's); GIM's frozen backward.

    Args:
        x: ``(..., hidden)`` float tensor; any strides.
        weight, bias: ``(hidden,)`` each, or None.
        eps: added to the variance before the rsqrt.
        frozen: GIM's frozen std: ``dx = (g - mean(g)) * rstd`` with ``g = dy * weight`` (the mean's
            gradient kept, the std's dropped); False gives the ordinary gradient. dweight / dbias ordinary.
        cast: ``"torch"`` (``F.layer_norm`` in x's dtype), ``"fp32"`` (OLMo: computed in fp32 and cast
            back) or ``"cohere"`` (Cohere's fp32 formula).
        backend: ``"torch"``, ``"triton"`` or ``"cuda"``; default ``$FASTGIM_NORM_BACKEND`` or the preferred one.

    Returns:
        ``x.shape`` in the dtype of ``x``.
    """
    _check_x(x, "x")
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)
    if cast not in LAYER_NORM_CASTS:
        raise ValueError(f"unknown layer_norm cast {cast!r}; choose one of {', '.join(LAYER_NORM_CASTS)}")
    if cast == "torch":
        for name_, p in (("weight", weight), ("bias", bias)):
            if p is not None and p.dtype != x.dtype:
                raise ValueError(
                    f"layer_norm(cast='torch') needs {name_} in x's dtype ({x.dtype}), got {p.dtype}; "
                    f"cast it or use cast='fp32'"
                )
    name = resolve_norm_backend(x.device, backend)
    out, _, _ = _layer_norm_forward_op(x, weight, bias, _check_eps(eps), cast, bool(frozen), name)
    return out


def gated_activation(
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    activation: str = "silu",
    gate_scale: float = 1.0,
    up_scale: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(gate) * up`` (SwiGLU / GeGLU) whose backward scales the two branches' gradients.

    Args:
        gate, up: same shape and dtype, float.
        activation: ``"silu"`` / ``"swish"``, ``"gelu_pytorch_tanh"`` / ``"gelu_tanh"`` (tanh approximation),
            ``"gelu"`` (erf) or ``"gelu_new"`` (transformers' NewGELU formula).
        gate_scale, up_scale: multiply the gradients into ``gate`` and ``up`` (GIM: 0.5 each; 1 = ordinary).
        backend: ``"torch"``, ``"triton"`` or ``"cuda"`` (the CUDA extension has no activation kernel, so
            ``"cuda"`` runs Triton here); default ``$FASTGIM_NORM_BACKEND`` or the preferred one.

    Returns:
        ``gate.shape`` in the dtype of ``gate``; forward equal to ``ACT2FN[activation](gate) * up``.
    """
    _check_x(gate, "gate")
    _check_x(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must share dtype and device, got {gate.dtype}/{gate.device} and "
                         f"{up.dtype}/{up.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    name = resolve_norm_backend(gate.device, backend)
    return _gated_forward_op(gate, up, activation, float(gate_scale), float(up_scale), name)


__all__ = ["rms_norm", "layer_norm", "gated_activation", "resolve_norm_backend", "NORM_BACKENDS", "RMS_CASTS",
           "LAYER_NORM_CASTS", "ACTIVATIONS"]
