"""``sdpa`` backend: GIM attention built from PyTorch's own attention kernels (no kernel of ours).

Same ``forward`` / ``backward`` contract and semantics as :mod:`fastgim.ops.attention_reference`
(its module docstring is the spec), except that a logit softcap is refused (the kernels have none).

GIM's backward is exact from two ordinary attention calls. With ``P = softmax(s S)`` and
``P_T = softmax(s S / T)`` (an additive float mask is divided by ``T`` too)::

    forward:   (O, LSE) at scale s;  (O_T, LSE_T) at scale s / T   (kept when GIM will need them)
    backward:  dV       from the ordinary backward at scale s with (O, LSE) and dO
               dQ, dK   from the backward at scale s / T with (O_T, LSE_T) fed T dO

The second backward computes ``D = rowsum(T dO * O_T)``, ``dS = P_T * (T dO V^T - D)`` and
``dQ = (s / T) dS K``: the ``T`` of the fed gradient cancels the ``1 / T`` of the scale, leaving GIM's
``dS = P_T * (dP - rowsum(dP * P_T))`` without a ``1 / T``. The Q/K/V gradient scales are applied
after. Cost: about twice a plain attention forward + backward.

Kernels (``torch.ops.aten``): on CPU ``_scaled_dot_product_flash_attention_for_cpu`` and its
backward (any float dtype, native GQA, additive mask in q's dtype). On CUDA
``_scaled_dot_product_flash_attention`` (fp16 / bf16, sm80+, native GQA, no mask) when there is no
mask, else ``_scaled_dot_product_efficient_attention`` (fp32 too, additive bias; K/V repeated for
GQA and dK/dV summed back). cuDNN attention is not used: its LSE layout and causal alignment have
changed between PyTorch versions, and flash serves the unmasked fast path.

Masks. Causal masking goes to the kernel's ``is_causal`` only when ``Lq == Lk`` (the kernels align
it top-left, the spec bottom-right); otherwise causality, the sliding window, key padding and 4D
masks become one additive ``0 / -inf`` bias in q's dtype (finite float-mask values clamped into its
range: a float32 ``finfo.min`` stays a huge negative for half inputs). Rows with no visible key are
set to 0 with LSE ``-inf`` (the kernels give 0 or NaN there), and get zero gradients.

Gates. :func:`fastgim.attention` multiplies the output by the gate outside the op for this
backend (``GATE_IN_KERNEL = False``: the gate's gradient comes from autograd). Called directly
with a gate, :func:`forward` gates the output and :func:`backward` recomputes the ungated output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastgim.ops.attention_reference import allowed_positions

STATS_IN_FORWARD = True
GATE_IN_KERNEL = False

_aten = torch.ops.aten
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLASH_MAX_HEAD_DIM = 256
_LSE_ROWS_EFFICIENT = 32  # the efficient kernel pads its LSE rows to a multiple of this
_BIAS_ALIGN = 16  # the efficient kernel wants the bias rows' stride a multiple of 16 elements

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def is_available(device: torch.device | str) -> bool:
    """True for CPU tensors, and for CUDA tensors when CUDA is available."""
    device = torch.device(device)
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())


def unsupported(q: torch.Tensor, softcap: float | None) -> str | None:
    """Why this backend cannot run the call (a sentence naming the fix), or None if it can."""
    if softcap is not None:
        return ("the sdpa attention backend cannot apply a logit softcap (PyTorch's attention kernels have "
                "none); use backend='torch' (any device) or backend='triton' (CUDA)")
    if q.device.type == "cuda" and q.dtype not in _CUDA_DTYPES:
        return (f"the sdpa attention backend runs float16, bfloat16 and float32 on CUDA, got {q.dtype}; "
                f"cast the inputs or use backend='torch'")
    if q.device.type not in ("cpu", "cuda", "meta"):
        return f"the sdpa attention backend runs on CPU and CUDA tensors, got {q.device}; use backend='torch'"
    return None


def _check(q: torch.Tensor, softcap: float | None) -> None:
    reason = unsupported(q, softcap)
    if reason is not None:
        raise ValueError(reason) if softcap is not None else TypeError(reason)


# --------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One family of aten attention ops: ``forward(q, k, v, bias, causal, scale) -> (out, lse)`` and
    ``backward(dout, q, k, v, out, lse, bias, causal, scale) -> (dq, dk, dv)``."""

    name: str
    forward: Forward
    backward: Backward
    native_gqa: bool
    head_dim_multiple: int


def _cpu_forward(q, k, v, bias, causal, scale):
    return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)


def _cpu_backward(dout, q, k, v, out, lse, bias, causal, scale):
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)


def _flash_forward(q, k, v, bias, causal, scale):
    result = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return result[0], result[1]


def _flash_backward(dout, q, k, v, out, lse, bias, causal, scale):
    # Without dropout the RNG state is never read; the cumulative lengths are None for dense batches.
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    return _aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset, scale=scale)


def _efficient_bias(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The bias as the efficient kernel wants it: rows aligned to 16 elements, expanded to (B, H, Lq, Lk)."""
    if bias is None:
        return None
    lk = bias.shape[-1]
    if lk % _BIAS_ALIGN or bias.stride(-1) != 1 or bias.stride(-2) % _BIAS_ALIGN:
        bias = F.pad(bias, (0, -lk % _BIAS_ALIGN))[..., :lk]
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _efficient_forward(q, k, v, bias, causal, scale):
    out, lse = _aten._scaled_dot_product_efficient_attention(
        q, k, v, _efficient_bias(bias, q, k), True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : q.shape[2]]


def _efficient_backward(dout, q, k, v, out, lse, bias, causal, scale):
    rows = -(-q.shape[2] // _LSE_ROWS_EFFICIENT) * _LSE_ROWS_EFFICIENT
    lse = F.pad(lse, (0, rows - q.shape[2])).contiguous()
    seed = offset = torch.empty((), dtype=torch.int64)  # read only with dropout
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, _efficient_bias(bias, q, k), out, lse, seed, offset, 0.0, [True, True, True, False], causal,
        scale=scale)
    return dq, dk, dv


CPU = Kernels("flash_cpu", _cpu_forward, _cpu_backward, native_gqa=True, head_dim_multiple=1)
FLASH = Kernels("flash", _flash_forward, _flash_backward, native_gqa=True, head_dim_multiple=8)
EFFICIENT = Kernels("efficient", _efficient_forward, _efficient_backward, native_gqa=False, head_dim_multiple=8)


def choose_kernels(device_type: str, dtype: torch.dtype, head_dim: int, has_bias: bool,
                   capability: tuple[int, int] | None = None) -> Kernels:
    """The kernels for a problem: CPU flash on CPU; on CUDA flash when it can, else efficient."""
    if device_type == "cpu":
        return CPU
    padded = -(-head_dim // FLASH.head_dim_multiple) * FLASH.head_dim_multiple
    flash_ok = (not has_bias and dtype in (torch.float16, torch.bfloat16) and padded <= _FLASH_MAX_HEAD_DIM
                and (capability is None or capability >= (8, 0)))
    return FLASH if flash_ok else EFFICIENT


# --------------------------------------------------------------------------- one problem


@dataclasses.dataclass
class Plan:
    """Everything a call needs besides the tensors: kernels, bias, causal flag, rows with no key."""

    kernels: Kernels
    bias: torch.Tensor | None  # additive, q's dtype, broadcastable to (B, Hq, Lq, Lk)
    finite_bias: bool  # the bias holds a float mask's finite values (so S / T divides them too)
    temperature: float
    causal: bool  # passed to the kernel (Lq == Lk only)
    dead: torch.Tensor | None  # bool, broadcastable to (B, Hq, Lq): rows with no visible key
    head_dim: int  # q / k / v padded to this last size

    def _bias(self, tempered: bool) -> torch.Tensor | None:
        if tempered and self.finite_bias and self.temperature != 1.0:
            return self.bias / self.temperature  # -inf stays -inf
        return self.bias

    def attend(self, q, k, v, scale: float, tempered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq))``; dead rows 0 and -inf.

        The LSE is the kernel's: float32, or float64 for float64 inputs on CPU."""
        qp, kp, vp = self._operands(q, k, v)
        out, lse = self.kernels.forward(qp, kp, vp, self._bias(tempered), self.causal, scale)
        out = out[..., : v.shape[-1]].contiguous()  # the op's fake promises contiguous outputs
        if self.dead is not None:
            out = out.masked_fill(self.dead[..., None], 0.0)
            lse = lse.masked_fill(self.dead, float("-inf"))
        return out, lse

    def grads(self, dout, q, k, v, out, lse, scale: float, tempered: bool = False):
        """``(dq, dk, dv)`` of the ordinary attention backward at ``scale`` with the saved ``out`` / ``lse``."""
        qp, kp, vp = self._operands(q, k, v)
        width = self.head_dim
        dout_p, out_p = (_pad_last(_last_contiguous(t.to(q.dtype)), width) for t in (dout, out))
        lse = torch.where(torch.isneginf(lse), 0.0, lse)  # dead rows: P = exp(-inf - 0) = 0
        lse = lse.to(torch.float64 if q.dtype == torch.float64 and self.kernels is CPU else torch.float32)
        dq, dk, dv = self.kernels.backward(dout_p, qp, kp, vp, out_p, lse.contiguous(), self._bias(tempered),
                                           self.causal, scale)
        dk, dv = (self._sum_groups(g, k.shape[1]) for g in (dk, dv))
        return tuple(g[..., :size].contiguous() for g, size in ((dq, q.shape[-1]), (dk, k.shape[-1]),
                                                                 (dv, v.shape[-1])))

    def _operands(self, q, k, v):
        q, k, v = (_pad_last(_last_contiguous(t), self.head_dim) for t in (q, k, v))
        if not self.kernels.native_gqa and k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return q, k, v

    @staticmethod
    def _sum_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
        if grad.shape[1] == kv_heads:
            return grad
        batch, heads, length, dim = grad.shape
        wide = torch.promote_types(grad.dtype, torch.float32)
        return grad.view(batch, kv_heads, heads // kv_heads, length, dim).sum(dim=2, dtype=wide).to(grad.dtype)


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _allowed(attention_mask, lq, lk, causal, sliding_window, device):
    """Boolean mask of allowed positions (or None) and the float mask to add (or None)."""
    allowed = allowed_positions(lq, lk, causal=causal, sliding_window=sliding_window, device=device)
    allowed = None if allowed is None else allowed[None, None]
    additive = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            keep = attention_mask.to(torch.bool)[:, None, None, :]
        elif attention_mask.dtype == torch.bool:
            keep = attention_mask
        else:
            additive, keep = attention_mask, ~torch.isneginf(attention_mask)
        allowed = keep if allowed is None else allowed & keep
    return allowed, additive


def make_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attention_mask: torch.Tensor | None,
              causal: bool, sliding_window: int | None, temperature: float) -> Plan:
    """Kernels, bias and dead rows for one problem (CPU kernels for CPU tensors, CUDA ones otherwise)."""
    lq, lk = q.shape[2], k.shape[2]
    simple = attention_mask is None and sliding_window is None and (not causal or lq == lk)
    allowed, additive = (None, None) if simple else _allowed(attention_mask, lq, lk, causal, sliding_window,
                                                             q.device)
    bias = dead = None
    if allowed is not None:
        dead = ~allowed.any(dim=-1)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        if additive is not None:  # its -inf entries are in ``allowed``; clamp the rest into q's range
            limits = torch.finfo(q.dtype)
            bias = bias + additive.clamp(limits.min, limits.max).to(q.dtype)
    capability = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
    head_dim = max(q.shape[-1], v.shape[-1])
    kernels = choose_kernels(q.device.type, q.dtype, head_dim, bias is not None, capability)
    head_dim = -(-head_dim // kernels.head_dim_multiple) * kernels.head_dim_multiple
    return Plan(kernels, bias, additive is not None, temperature, causal and lq == lk, dead, head_dim)


# --------------------------------------------------------------------------- the backend contract


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
    """Attention forward from PyTorch's kernels.

    Args: q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)`` (any float dtype on
    CPU; fp32 / fp16 / bf16 on CUDA; any strides); ``attention_mask`` (B, Lk) bool key padding or a
    4D bool / additive mask broadcastable to (B, Hq, Lq, Lk); ``gate`` (B, Hq) or None; ``softcap``
    must be None.

    Returns ``(out, lse, o_t, lse_t)``: out ``(B, Hq, Lq, Dv)`` in q's dtype (0 on rows with no
    visible key), lse ``(B, Hq, Lq)`` float32 (-inf there). With ``want_gim_stats`` and
    ``temperature != 1``: ``o_t = softmax(S / T) V`` (ungated, q's dtype) and ``lse_t`` (float32);
    otherwise both empty.
    """
    _check(q, softcap)
    plan = make_plan(q, k, v, attention_mask=attention_mask, causal=causal, sliding_window=sliding_window,
                     temperature=temperature)
    out, lse = plan.attend(q, k, v, scale)
    o_t, lse_t = q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    if want_gim_stats and temperature != 1.0:
        o_t, lse_t = plan.attend(q, k, v, scale / temperature, tempered=True)
    if gate is not None:
        out = out * gate.to(out.dtype)[:, :, None, None]
    return out, lse.float(), o_t, lse_t.float()


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

    ``out``, ``lse``, ``o_t``, ``lse_t`` are what a forward returned (this backend's or the triton
    backend's: same semantics). Empty ``o_t`` with ``temperature != 1``, a gate (``out`` is gated)
    or float64 inputs (the float32 LSE is not exact enough) make it recompute what it needs.
    Returns ``(dq, dk, dv, dgate)`` shaped and typed like q, k, v and gate; dgate is None without a gate.
    """
    _check(q, softcap)
    plan = make_plan(q, k, v, attention_mask=attention_mask, causal=causal, sliding_window=sliding_window,
                     temperature=temperature)
    exact = q.dtype != torch.float64
    if gate is not None or not exact:
        out, lse = plan.attend(q, k, v, scale)
    dgate = None
    if gate is not None:
        dgate = (dout.float() * out.float()).sum(dim=(-1, -2)).to(gate.dtype)
        dout = dout * gate.to(dout.dtype)[:, :, None, None]
    dq, dk, dv = plan.grads(dout, q, k, v, out, lse, scale)
    if temperature != 1.0:
        if o_t.numel() == 0 or not exact:
            o_t, lse_t = plan.attend(q, k, v, scale / temperature, tempered=True)
        dq, dk, _ = plan.grads(dout * temperature, q, k, v, o_t, lse_t, scale / temperature, tempered=True)
    return dq * q_scale, dk * k_scale, dv * v_scale, dgate
