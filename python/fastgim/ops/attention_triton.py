"""Triton backend of :func:`fastgim.attention`: flash forward, GIM backward (``kernels/attention.py``).

Semantics are those of :mod:`fastgim.ops.attention_reference`. The kernels module is imported
lazily, so ``TRITON_INTERPRET=1`` set before the first call makes them run on CPU tensors.

``STATS_IN_FORWARD`` picks how the GIM backward gets ``LSE_T`` and ``D_T``: ``True`` (option A,
the default) makes the forward also accumulate ``O_T = softmax(S / T) V`` and ``LSE_T`` when the
op asks for them; ``False`` (option B) runs a stats loop at the start of the backward instead.
The environment variable ``FASTGIM_GIM_STATS=forward|backward``, read at import, overrides it.
The analysis behind the default is in the docstring of ``fastgim.kernels.attention``.
"""

from __future__ import annotations

import os

import torch


def _stats_in_forward_default() -> bool:
    choice = os.environ.get("FASTGIM_GIM_STATS", "forward").strip().lower()
    if choice not in ("forward", "backward"):
        raise ValueError(f"FASTGIM_GIM_STATS must be 'forward' or 'backward', got {choice!r}")
    return choice == "forward"


STATS_IN_FORWARD: bool = _stats_in_forward_default()

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def is_available(device: torch.device | str) -> bool:
    """True when Triton imports and ``device`` is CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None) -> None:
    if q.dtype not in _DTYPES:
        raise TypeError(
            f"the triton attention backend supports float32, float16 and bfloat16, got {q.dtype}; "
            f"cast the inputs or use backend='torch'"
        )
    if not is_available(q.device):
        raise RuntimeError(
            f"the triton attention backend cannot run on {q.device} tensors; use CUDA tensors, set "
            f"TRITON_INTERPRET=1 before importing fastgim for CPU tests, or use backend='torch'"
        )
    for name, size in (("q/k head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
        if size > MAX_HEAD_DIM:
            raise ValueError(f"{name} {size} exceeds the triton backend's maximum {MAX_HEAD_DIM}; "
                             f"use backend='torch'")
    if gate is not None and gate.dtype not in _DTYPES:
        raise TypeError(f"gate must be float32, float16 or bfloat16, got {gate.dtype}")


def _split_mask(attention_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(key padding (B, Lk) bool contiguous, dense 4D mask) from the op's normalised mask."""
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 2:
        return attention_mask.to(torch.bool).contiguous(), None
    if attention_mask.dtype == torch.float64:
        attention_mask = attention_mask.float()
    return None, attention_mask


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    gate: torch.Tensor | None,
    causal: bool,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    temperature: float,
    want_gim_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-attention forward.

    Args: q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)`` (fp32/fp16/bf16, any
    strides, D and Dv <= 256); ``attention_mask`` (B, Lk) bool key padding or a 4D bool / additive
    mask broadcastable to (B, Hq, Lq, Lk); ``gate`` (B, Hq) or None.

    Returns ``(out, lse, o_t, lse_t)``: out ``(B, Hq, Lq, Dv)`` in q's dtype, lse ``(B, Hq, Lq)``
    fp32 (-inf on fully masked rows, whose out is 0). When ``want_gim_stats`` and
    ``STATS_IN_FORWARD`` and ``temperature != 1``: ``o_t`` = softmax(S/T) V (ungated, q's dtype) and
    ``lse_t`` (fp32); otherwise both are empty.
    """
    _check(q, k, v, gate)
    from fastgim.kernels.attention import flash_forward

    pad, mask = _split_mask(attention_mask)
    gate = None if gate is None else gate.contiguous()
    stats = bool(want_gim_stats and STATS_IN_FORWARD and temperature != 1.0)
    return flash_forward(
        q, k, v, pad=pad, mask=mask, gate=gate, causal=causal, scale=scale, window=sliding_window,
        softcap=softcap, temperature=temperature, stats=stats,
    )


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    o_t: torch.Tensor,
    lse_t: torch.Tensor,
    *,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GIM backward (the ordinary one when ``temperature == 1`` and the scales are 1).

    ``out``, ``lse``, ``o_t``, ``lse_t`` are what :func:`forward` returned; empty ``o_t`` / ``lse_t``
    with ``temperature != 1`` make the backward compute LSE_T and D_T itself (option B).
    Returns ``(dq, dk, dv, dgate)`` shaped and typed like q, k, v and gate; dgate is None without a gate.
    """
    _check(q, k, v, gate)
    from fastgim.kernels.attention import flash_backward

    pad, mask = _split_mask(attention_mask)
    gate = None if gate is None else gate.contiguous()
    if temperature != 1.0 and o_t.numel() > 0 and tuple(o_t.shape) != tuple(out.shape):
        raise ValueError(f"o_t must be empty or shaped like out {tuple(out.shape)}, got {tuple(o_t.shape)}")
    return flash_backward(
        dout, q, k, v, out.contiguous(), lse.contiguous(), o_t.contiguous(), lse_t.contiguous(),
        pad=pad, mask=mask, gate=gate, causal=causal, scale=scale, window=sliding_window,
        softcap=softcap, temperature=temperature, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale,
    )
