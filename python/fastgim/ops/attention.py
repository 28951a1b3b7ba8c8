"""``fastgim.attention``: flash attention whose backward is GIM's inside a GIM context.

Layering (as in FlashAttention's interface):

* backends (``triton``, ``cuda``, ``torch``, ``sdpa``, ``reference``) each expose
  ``forward(...) -> (out, lse, o_t, lse_t)`` and ``backward(...) -> (dq, dk, dv, dgate)``
  with the semantics written in :mod:`fastgim.ops.attention_reference`;
* ``torch.library.custom_op`` ops ``fastgim::attention_forward`` and
  ``fastgim::attention_backward`` with fake impls, so ``torch.compile`` traces them;
* autograd registered on the forward op;
* :func:`attention`, the public function, which validates and normalises inputs,
  picks the backend and reads the GIM settings from the context.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch

from fastgim.ops import attention_fallback as fallback
from fastgim.settings import PLAIN, AttentionGIM, GIMSettings, current_settings

BACKENDS = ("triton", "cuda", "torch", "sdpa", "reference")


def _load_backend(name: str) -> ModuleType:
    name = fallback.primary(name)  # the op may carry a fallback chain "triton>sdpa"
    if name == "torch":
        from fastgim.ops import attention_torch as module
    elif name == "reference":
        from fastgim.ops import attention_reference as module
    elif name == "triton":
        from fastgim.ops import attention_triton as module
    elif name == "cuda":
        from fastgim.ops import attention_cuda as module
    elif name == "sdpa":
        from fastgim.ops import attention_sdpa as module
    else:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return module


def _backend_available(name: str, device: torch.device) -> bool:
    try:
        module = _load_backend(name)
    except ImportError:
        return False
    return module.is_available(device) if hasattr(module, "is_available") else True


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend that will run on ``device``: ``requested``, else ``$FASTGIM_BACKEND``, else the fastest."""
    name = requested or os.environ.get("FASTGIM_BACKEND") or None
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
        if not _backend_available(name, device):
            raise RuntimeError(
                f"attention backend {name!r} is not available for {device.type} tensors; "
                f"unset FASTGIM_BACKEND or pick one of: torch, reference"
            )
        return name
    if device.type == "cuda" and _backend_available("triton", device):
        return "triton"
    return "torch"


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastgim::attention_forward", mutates_args=(), device_types=None)
def _attention_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gate: torch.Tensor | None,
    causal: bool,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    temperature: float,
    q_scale: float,
    k_scale: float,
    v_scale: float,
    want_gim_stats: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward; the scales are carried only so that autograd hands them to the backward."""
    out, lse, o_t, lse_t = fallback.run(backend, q, v, lambda name: _load_backend(name).forward(
        q, k, v, attention_mask=attention_mask, gate=gate, causal=causal, scale=scale,
        sliding_window=sliding_window, softcap=softcap, temperature=temperature, want_gim_stats=want_gim_stats,
    ))
    return out, lse, o_t, lse_t


@_attention_forward_op.register_fake
def _attention_forward_fake(q, k, v, attention_mask, gate, causal, scale, sliding_window, softcap, temperature,
                            q_scale, k_scale, v_scale, want_gim_stats, backend):
    batch, hq, lq, _ = q.shape
    out_shape = (batch, hq, lq, v.shape[-1])
    out = q.new_empty(out_shape)
    lse = q.new_empty((batch, hq, lq), dtype=torch.float32)
    stats = want_gim_stats and getattr(_load_backend(backend), "STATS_IN_FORWARD", False)
    o_t = q.new_empty(out_shape if stats else (0,))
    lse_t = q.new_empty((batch, hq, lq) if stats else (0,), dtype=torch.float32)
    return out, lse, o_t, lse_t


@torch.library.custom_op("fastgim::attention_backward", mutates_args=(), device_types=None)
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    o_t: torch.Tensor,
    lse_t: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gate: torch.Tensor | None,
    causal: bool,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    temperature: float,
    q_scale: float,
    k_scale: float,
    v_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dgate = fallback.run(backend, q, v, lambda name: _load_backend(name).backward(
        dout, q, k, v, out, lse, o_t, lse_t, attention_mask=attention_mask, gate=gate, causal=causal,
        scale=scale, sliding_window=sliding_window, softcap=softcap, temperature=temperature,
        q_scale=q_scale, k_scale=k_scale, v_scale=v_scale,
    ))
    dgate = q.new_empty(0) if dgate is None else dgate.to(gate.dtype)
    return dq, dk, dv, dgate


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, o_t, lse_t, attention_mask, gate, causal, scale,
                             sliding_window, softcap, temperature, q_scale, k_scale, v_scale, backend):
    # Backends return contiguous gradients whatever the inputs' strides (HF passes transposed views).
    dgate = gate.new_empty(gate.shape) if gate is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate


_FORWARD_ARGS = ("q", "k", "v", "attention_mask", "gate", "causal", "scale", "sliding_window", "softcap",
                 "temperature", "q_scale", "k_scale", "v_scale", "want_gim_stats", "backend")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FORWARD_ARGS, inputs))
    out, lse, o_t, lse_t = output
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, o_t, lse_t, args["attention_mask"],
                          args["gate"])
    ctx.options = {name: args[name] for name in ("causal", "scale", "sliding_window", "softcap", "backend")}
    ctx.gim = AttentionGIM(args["temperature"], args["q_scale"], args["k_scale"], args["v_scale"])


def _backward(ctx, dout, _dlse, _do_t, _dlse_t):
    q, k, v, out, lse, o_t, lse_t, attention_mask, gate = ctx.saved_tensors
    gim: AttentionGIM = ctx.gim
    dq, dk, dv, dgate = _attention_backward_op(
        dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse, o_t, lse_t, attention_mask, gate,
        ctx.options["causal"], ctx.options["scale"], ctx.options["sliding_window"], ctx.options["softcap"],
        gim.temperature, gim.q_scale, gim.k_scale, gim.v_scale, ctx.options["backend"],
    )
    dgate = dgate if gate is not None else None
    return (dq, dk, dv, None, dgate) + (None,) * (len(_FORWARD_ARGS) - 5)


_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def _normalise_mask(
    attention_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor
) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    batch, hq, lq, _ = q.shape
    lk = k.shape[2]
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, lk):
            raise ValueError(
                f"a 2D attention_mask is a key-padding mask of shape (batch, kv_len) = {(batch, lk)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.is_floating_point():
            raise ValueError("a 2D key-padding attention_mask must be bool or integer (1 = keep, 0 = pad)")
        return attention_mask.to(torch.bool).contiguous()
    if attention_mask.dim() == 4:
        mb, mh, mq, mk = attention_mask.shape
        if mb not in (1, batch) or mh not in (1, hq) or mq not in (1, lq) or mk != lk:
            raise ValueError(
                f"a 4D attention_mask must broadcast to (batch, heads, q_len, kv_len) = {(batch, hq, lq, lk)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
            raise ValueError("a 4D attention_mask must be bool (True = attend) or an additive float mask")
        return attention_mask
    raise ValueError(
        f"attention_mask must be 2D (batch, kv_len) key padding or 4D (batch, heads, q_len, kv_len), "
        f"got {attention_mask.dim()}D"
    )


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4D: q (batch, heads, q_len, head_dim), k/v (batch, kv_heads, kv_len, dim)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    batch, hq, _, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same heads and length, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != dim:
        raise ValueError(f"q and k head_dim differ: {dim} vs {k.shape[-1]}")
    if hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]}) for GQA/MQA")
    if gate is not None and tuple(gate.shape) != (batch, hq):
        raise ValueError(f"gate must have shape (batch, q_heads) = {(batch, hq)}, got {tuple(gate.shape)}")


def _attention_gim(gim: GIMSettings | AttentionGIM | bool | None) -> AttentionGIM:
    if gim is None:
        gim = current_settings()
    if gim is None or gim is False:
        return PLAIN
    if gim is True:
        return GIMSettings().attention
    if isinstance(gim, GIMSettings):
        return gim.attention
    if isinstance(gim, AttentionGIM):
        return gim
    raise TypeError(f"gim must be GIMSettings, AttentionGIM, bool or None, got {type(gim).__name__}")


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    gate: torch.Tensor | None = None,
    gim: GIMSettings | AttentionGIM | bool | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`attention` but also returns the row log-sum-exp ``(B, Hq, Lq)`` in float32."""
    _validate(q, k, v, gate)
    mask = _normalise_mask(attention_mask, q, k)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = resolve_backend(q.device, backend)
    if backend is None and not os.environ.get("FASTGIM_BACKEND"):
        name = fallback.automatic(name, q, v, softcap)
    module = _load_backend(name)
    settings = _attention_gim(gim)
    want_stats = settings.temperature != 1.0 and getattr(module, "STATS_IN_FORWARD", False)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, gate)
    )
    outer_gate = None if getattr(module, "GATE_IN_KERNEL", True) else gate  # gated here, by autograd
    out, lse, _, _ = _attention_forward_op(
        q, k, v, mask, None if outer_gate is not None else gate, bool(causal), scale,
        None if sliding_window is None else int(sliding_window),
        None if softcap is None else float(softcap),
        settings.temperature, settings.q_scale, settings.k_scale, settings.v_scale,
        bool(want_stats and needs_grad), name,
    )
    if outer_gate is not None:
        out = out * outer_gate.to(out.dtype)[:, :, None, None]
    return out, lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    gate: torch.Tensor | None = None,
    gim: GIMSettings | AttentionGIM | bool | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Flash attention whose backward is GIM's inside a GIM context.

    Args:
        q: ``(B, Hq, Lq, D)`` queries, float32 / float16 / bfloat16 (float64 on ``torch`` and
            ``reference``); any strides.
        k, v: ``(B, Hkv, Lk, D)`` and ``(B, Hkv, Lk, Dv)``; ``Hq`` a multiple of ``Hkv`` (GQA / MQA,
            never repeated in memory).
        causal: mask keys after the query; aligned bottom-right when ``Lq != Lk`` (query ``i`` is at
            position ``i + Lk - Lq``, as with a KV cache).
        scale: multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
        attention_mask: ``(B, Lk)`` key padding (bool or int, 1 = keep), or a 4D mask broadcastable to
            ``(B, Hq, Lq, Lk)``: bool (True = attend) or additive float.
        sliding_window: keys with ``pos - W < j`` (and ``j < pos + W`` if not causal) are kept.
        softcap: scores become ``softcap * tanh(scores / softcap)`` before masking (Gemma 2).
        gate: ``(B, Hq)`` multiplier on each head's output (Causal Head Gating); differentiable.
        gim: GIM rules for the backward. None reads the active :class:`fastgim.GIM` context
            (ordinary backward outside one); False forces the ordinary backward.
        backend: ``"triton"``, ``"cuda"``, ``"torch"``, ``"sdpa"`` or ``"reference"``; default
            ``$FASTGIM_BACKEND`` or the fastest available for the device. An automatic ``triton`` that
            cannot compile or launch warns once and runs ``sdpa`` (see :mod:`fastgim.ops.attention_fallback`).

    Returns:
        ``(B, Hq, Lq, Dv)`` in the dtype of ``q``. Rows with no visible key are 0.

    The backward uses the GIM settings active when the forward ran: softmax temperature ``T``
    (``dS = P_T * (dP - rowsum(dP * P_T))`` with ``P_T = softmax(S / T)``, forward ``P`` in dV) and
    the Q/K/V gradient scales.
    """
    out, _ = attention_with_lse(
        q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, sliding_window=sliding_window,
        softcap=softcap, gate=gate, gim=gim, backend=backend,
    )
    return out
