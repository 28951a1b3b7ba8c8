"""``torch`` backend: blockwise attention in plain PyTorch with O(N) memory, any device.

Same ``forward`` / ``backward`` contract and semantics as :mod:`fastgim.ops.attention_reference`
(its module docstring is the spec), computed one block of query rows at a time so the
``(Lq, Lk)`` score matrix never exists for all queries at once.

Layout. Queries are regrouped once to ``(B * Hkv, Lq * G, D)`` with row ``i * G + g`` for query
``i`` and head ``g`` of a key/value head's group of ``G = Hq // Hkv`` query heads, so one ``bmm``
against the shared ``(B * Hkv, Lk, D)`` keys serves the whole group (GQA / MQA without repeating
K/V) and a block of query rows is a zero-copy slice. A block only touches the keys that causality
and the sliding window leave visible to it, so causal attention costs about half.

Maths, per block (float32 for half inputs, float64 for float64)::

    forward:  S = (scale q) k^T [softcap, masks];  P = softmax(S);  O = P v;  LSE = logsumexp(S)
    backward: P = softmax(S);  P_T = softmax(S / T) (= P when T = 1)
              dV^T += dO_u^T P;  dP = dO v^T;  dS = P_T (dP - rowsum(dP P_T)) [* (1 - tanh^2)]
              dQ = dS k;  dK^T += q_u^T dS

with ``dO_u = gate * dO``, ``q_u = gate * scale * q`` and the gate folded into ``dQ``: the gate never
divides anything, and ``dgate = sum_rows rowsum(dP P)`` with the ungated ``dP`` (that is
``rowsum(dO * (P v))``). The backward recomputes ``P`` with the fused softmax kernel, which is
cheaper on CPU than ``exp(S - LSE)`` and exact in float64 although the LSE is stored in float32;
for ``T = 2``, ``P = P_T^2 / rowsum(P_T^2)`` saves a second softmax (the row normalisation is
folded into ``dO`` and ``dgate``). Without softcap, ``1 / T`` is folded into the queries that make
the scores. On CPU, :mod:`fastgim.ops.attention_cpu` (a C++ kernel) takes the backward over when it
serves the problem (no mask, window or softcap). For ``T = 2`` in float32 with no dead row, the backward skips the softmax altogether:
``E = exp((S - LSE) / 2)`` from the forward's LSE (as ``exp2``, with ``log2(e) / 2`` folded into the
queries and ``-LSE`` added inside the score matmul) gives ``P = E^2`` exactly and ``P_T = E / rowsum(E)``,
whose row factor is folded into the ``(rows, D)`` operands of ``dQ`` and ``dK``. The forward of the
plain float32 / bfloat16 / float16 case (no mask, window or softcap) is PyTorch's fused CPU
flash-attention kernel.
Masks of every kind are applied
as additive ``0 / -inf`` float tiles (bool kernels are slow on CPU). Score-sized temporaries live
in a workspace reused by every block, capped by :data:`BLOCK_BUDGET_BYTES` (with at least
:data:`MIN_BLOCK_ROWS` query rows per block).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch

from fastgim.ops import attention_cpu

STATS_IN_FORWARD = False
#: Target size in bytes of one score-sized temporary (all batches and heads of a block of rows).
BLOCK_BUDGET_BYTES = 4 * 2**20
#: Fewest query rows in a block (unless the query is shorter).
MIN_BLOCK_ROWS = 16

#: Blocks a causal / windowed problem is split into at least (block size permitting).
_MASKED_BLOCKS = 8

_NEG_INF = float("-inf")
#: Dtypes of the fused CPU flash-attention forward (it accumulates half inputs in float32).
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_available(device: torch.device) -> bool:
    """This backend runs on every device PyTorch supports."""
    return True


# --------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class _Plan:
    batch: int
    hq: int
    hkv: int
    lq: int
    lk: int
    causal: bool
    window: int | None
    rows: int  # query rows per block

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def offset(self) -> int:
        """Query ``i`` sits at key position ``i + offset`` (bottom-right alignment)."""
        return self.lk - self.lq

    def blocks(self) -> Iterator[tuple[int, int, int, int]]:
        """Yields ``(i0, i1, lo, hi)``: query rows ``[i0, i1)`` and the keys ``[lo, hi)`` they can see.

        Blocks whose rows see no key at all are skipped (their outputs and gradients stay 0).
        """
        for i0 in range(0, self.lq, self.rows):
            i1 = min(i0 + self.rows, self.lq)
            lo, hi = 0, self.lk
            if self.causal:
                hi = min(hi, i1 + self.offset)
            if self.window is not None:
                lo = max(lo, i0 + self.offset - self.window + 1)
                if not self.causal:
                    hi = min(hi, i1 - 1 + self.offset + self.window)
            if hi > lo:
                yield i0, i1, lo, hi


def _make_plan(q: torch.Tensor, k: torch.Tensor, causal: bool, window: int | None, dtype: torch.dtype) -> _Plan:
    batch, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    visible = lk if window is None else min(lk, (1 if causal else 2) * window)
    per_row = max(1, batch * hq * visible * torch.finfo(dtype).bits // 8)
    rows = min(lq, max(MIN_BLOCK_ROWS, BLOCK_BUDGET_BYTES // per_row))
    if causal or window is not None:
        # Several blocks, so that most hidden keys are skipped rather than masked.
        rows = min(rows, max(MIN_BLOCK_ROWS, -(-lq // _MASKED_BLOCKS)))
    return _Plan(batch, hq, hkv, lq, lk, bool(causal), window, max(1, rows))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Workspace:
    """Flat buffers reused across blocks; ``get(name, shape)`` views the first ``numel`` elements."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)


# --------------------------------------------------------------------------- layouts


def _to_rows(x: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, Hq, L, D)`` -> new contiguous ``(B * Hkv, L * G, D)`` in ``dtype``, row ``i * G + g``."""
    batch, hq, length, dim = x.shape
    group = hq // hkv
    out = torch.empty((batch, hkv, length, group, dim), dtype=dtype, device=x.device)
    out.copy_(x.reshape(batch, hkv, group, length, dim).transpose(2, 3))
    return out.view(batch * hkv, length * group, dim)


def _to_heads(x: torch.Tensor, batch: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_to_rows`: ``(B * Hkv, L * G, D)`` -> new contiguous ``(B, Hq, L, D)``."""
    hkv = x.shape[0] // batch
    length, dim = x.shape[1] // group, x.shape[2]
    out = torch.empty((batch, hkv, group, length, dim), dtype=dtype, device=x.device)
    out.copy_(x.view(batch, hkv, length, group, dim).transpose(2, 3))
    return out.view(batch, hkv * group, length, dim)


def _to_kv(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, Hkv, Lk, D)`` -> contiguous ``(B * Hkv, Lk, D)`` in ``dtype`` (may be ``x`` itself; read only)."""
    batch, hkv, length, dim = x.shape
    return x.to(dtype).contiguous().view(batch * hkv, length, dim)


def _group_view(x: torch.Tensor, group: int) -> torch.Tensor:
    """``(BH, L * G, D)`` -> ``(BH, L, G, D)`` view, to broadcast per-head ``(BH, 1, G, 1)`` factors."""
    return x.view(x.shape[0], x.shape[1] // group, group, x.shape[2])


def _gate_rows(gate: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, Hq)`` gate -> ``(B * Hkv, 1, G, 1)``, matching :func:`_group_view`."""
    batch, hq = gate.shape
    return gate.to(dtype).reshape(batch * hkv, 1, hq // hkv, 1)


# --------------------------------------------------------------------------- masking


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool ``allowed`` -> float ``0`` (True) / ``-inf`` (False): ``1 - 1 / x`` on 0/1 floats, all fast kernels."""
    return allowed.view(torch.uint8).to(dtype).reciprocal_().neg_().add_(1.0)


class _Masker:
    """Adds causality, the sliding window and the user's mask to one block of scores, in place."""

    def __init__(
        self, plan: _Plan, attention_mask: torch.Tensor | None, dtype: torch.dtype, factor: float = 1.0
    ) -> None:
        self.plan, self.dtype, self.factor = plan, dtype, factor  # factor: multiplies a float 4D mask
        self.padding: torch.Tensor | None = None  # (B, 1, 1, 1, Lk) additive
        self.dense: torch.Tensor | None = None  # (mb, Hkv | 1, mq, G | 1, Lk), bool or additive
        self._causal_tiles: dict[tuple[int, int, int], torch.Tensor] = {}
        if attention_mask is None:
            return
        if attention_mask.dim() == 2:
            self.padding = _additive(attention_mask.to(torch.bool), dtype).view(plan.batch, 1, 1, 1, plan.lk)
            return
        mb, mh, mq, mk = attention_mask.shape
        if mh == 1:
            self.dense = attention_mask.view(mb, 1, mq, 1, mk)
        else:
            self.dense = attention_mask.view(mb, plan.hkv, plan.group, mq, mk).transpose(2, 3)

    def apply(self, scores: torch.Tensor, i0: int, i1: int, lo: int, hi: int) -> None:
        """``scores``: ``(B * Hkv, (i1 - i0) * G, hi - lo)`` for query rows ``[i0, i1)``, keys ``[lo, hi)``."""
        plan = self.plan
        s5 = scores.view(plan.batch, plan.hkv, i1 - i0, plan.group, hi - lo)
        if self.dense is not None:
            tile = self.dense if self.dense.shape[2] == 1 else self.dense[:, :, i0:i1]
            tile = tile[..., lo:hi]
            if tile.dtype == torch.bool:
                s5.add_(_additive(tile, self.dtype))
            else:
                s5.add_(tile, alpha=self.factor)
        if self.padding is not None:
            s5.add_(self.padding[..., lo:hi])
        self._positions(s5, i0, i1, lo, hi)

    def _positions(self, s5: torch.Tensor, i0: int, i1: int, lo: int, hi: int) -> None:
        """Causal / window masking, only over the key columns where some row of the block needs it."""
        plan = self.plan
        if plan.causal and plan.window is None:
            self._causal(s5, i0, i1, lo, hi)
            return
        pos = torch.arange(i0, i1, device=s5.device)[:, None] + plan.offset  # (c, 1)
        if plan.causal:
            self._band(s5, pos, lo, max(i0 + plan.offset + 1, lo), hi, lambda keys: keys <= pos)
        if plan.window is not None:
            window = plan.window
            stop = min(i1 + plan.offset - window, hi)
            self._band(s5, pos, lo, lo, stop, lambda keys: keys > pos - window)
            if not plan.causal:
                start = max(i0 + plan.offset + window, lo)
                self._band(s5, pos, lo, start, hi, lambda keys: keys < pos + window)

    def _causal(self, s5: torch.Tensor, i0: int, i1: int, lo: int, hi: int) -> None:
        """Causal masking alone; the band tile depends only on its shape and shift, so it is cached."""
        start = max(i0 + self.plan.offset + 1, lo)
        if start >= hi:
            return
        shift = i0 + self.plan.offset - start  # row r sees band columns c <= r + shift
        key = (i1 - i0, hi - start, shift)
        tile = self._causal_tiles.get(key)
        if tile is None:
            rows = torch.arange(i1 - i0, device=s5.device)[:, None] + shift
            cols = torch.arange(hi - start, device=s5.device)[None, :]
            tile = self._causal_tiles[key] = _additive(cols <= rows, self.dtype)[:, None, :]
        s5[..., start - lo:hi - lo].add_(tile)

    def _band(self, s5, pos, lo, start, stop, allowed_fn) -> None:
        if start >= stop:
            return
        keys = torch.arange(start, stop, device=s5.device)[None, :]
        tile = _additive(allowed_fn(keys), self.dtype)  # (c, stop - start)
        s5[..., start - lo:stop - lo].add_(tile[:, None, :])


def _block_scores(
    ws: _Workspace, qs: torch.Tensor, k3: torch.Tensor, masker: _Masker, block: tuple[int, int, int, int],
    group: int, softcap: float | None, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked scores ``(BH, rows, keys)`` of a block (workspace) and ``tanh(S_raw / softcap)`` (or None).

    ``bias``: ``(BH, Lq * G, 1)`` added to every score of a row inside the matmul (not with ``softcap``).
    """
    i0, i1, lo, hi = block
    rows = slice(i0 * group, i1 * group)
    q_rows = qs[:, rows]
    scores = ws.get("s", (qs.shape[0], q_rows.shape[1], hi - lo))
    if bias is None:
        torch.bmm(q_rows, k3[:, lo:hi].transpose(1, 2), out=scores)
    else:
        torch.baddbmm(bias[:, rows], q_rows, k3[:, lo:hi].transpose(1, 2), out=scores)
    tanh = None
    if softcap is not None:
        tanh = torch.div(scores, softcap, out=ws.get("tanh", scores.shape)).tanh_()
        torch.mul(tanh, softcap, out=scores)
    masker.apply(scores, i0, i1, lo, hi)
    return scores, tanh


def _softmax_(scores: torch.Tensor, dead_rows: bool) -> torch.Tensor:
    """Row softmax in place (fused kernel). If ``dead_rows``, rows that are all ``-inf`` become 0, not NaN."""
    if scores.device.type == "cpu":  # the CPU kernel reads each row before writing it: in place is safe
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    else:
        probs = scores.copy_(torch.softmax(scores, dim=-1))
    return probs.nan_to_num_(nan=0.0) if dead_rows else probs


# --------------------------------------------------------------------------- forward


def _fused_forward(q, k, v, attention_mask, gate, causal, scale, sliding_window, softcap):
    """PyTorch's fused CPU flash-attention kernel for the plain float32 / bfloat16 / float16 case, else None."""
    batch, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if (
        q.device.type != "cpu" or q.dtype not in _FUSED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype
        or attention_mask is not None or sliding_window is not None or softcap is not None
        or v.shape[-1] != dim or (causal and lq != lk) or lq == 0 or lk == 0
    ):
        return None
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None:
        return None
    group = hq // hkv
    if group > 1:
        k = k[:, :, None].expand(batch, hkv, group, lk, dim).reshape(batch, hq, lk, dim)
        v = v[:, :, None].expand(batch, hkv, group, lk, dim).reshape(batch, hq, lk, dim)
    out, lse = kernel(q, k, v, 0.0, bool(causal), attn_mask=None, scale=float(scale))
    if gate is not None:
        out = out * gate.to(out.dtype)[:, :, None, None]
    out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    return out, lse, q.new_empty(0), q.new_empty(0, dtype=torch.float32)


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
    """Blockwise attention forward.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``: one floating dtype, any
            strides, ``Hq % Hkv == 0``. The keywords are as in
            :func:`fastgim.ops.attention_reference.forward` (mask already normalised by
            :func:`fastgim.attention`: 2D bool key padding, or 4D bool / additive float).

    Returns:
        ``(out, lse, o_t, lse_t)``: ``out`` ``(B, Hq, Lq, Dv)`` in ``q.dtype`` (0 on rows with no
        visible key) and ``lse`` ``(B, Hq, Lq)`` float32 (``-inf`` on such rows). This backend keeps
        no GIM statistics, so ``o_t`` / ``lse_t`` are empty and ``temperature`` /
        ``want_gim_stats`` are unused.
    """
    fused = _fused_forward(q, k, v, attention_mask, gate, causal, scale, sliding_window, softcap)
    if fused is not None:
        return fused
    dtype = _compute_dtype(q.dtype)
    plan = _make_plan(q, k, causal, sliding_window, dtype)
    group = plan.group
    qs = _to_rows(q, plan.hkv, dtype).mul_(scale)
    k3, v3 = _to_kv(k, dtype), _to_kv(v, dtype)
    out = torch.zeros((qs.shape[0], qs.shape[1], v.shape[-1]), dtype=dtype, device=q.device)
    lse = torch.full((qs.shape[0], qs.shape[1], 1), _NEG_INF, dtype=dtype, device=q.device)
    ws, masker = _Workspace(dtype, q.device), _Masker(plan, attention_mask, dtype)
    for block in plan.blocks():
        i0, i1, lo, hi = block
        rows = slice(i0 * group, i1 * group)
        scores, _ = _block_scores(ws, qs, k3, masker, block, group, softcap)
        row_max = scores.amax(dim=-1, keepdim=True)
        probs = _softmax_(scores, bool((row_max == _NEG_INF).any()))
        torch.bmm(probs, v3[:, lo:hi], out=out[:, rows])
        # The largest probability is exp(max - LSE) = 1 / rowsum(exp(S - max)).
        torch.sub(row_max, probs.amax(dim=-1, keepdim=True).log_(), out=lse[:, rows])
    lse.nan_to_num_(nan=_NEG_INF)  # rows with no visible key: -inf - log(0)
    if gate is not None:
        _group_view(out, group).mul_(_gate_rows(gate, plan.hkv, dtype))
    # Distinct empty tensors: a custom op's outputs must not alias each other.
    return (
        _to_heads(out, plan.batch, group, q.dtype),
        _to_heads(lse, plan.batch, group, torch.float32).squeeze(-1),
        q.new_empty(0),
        q.new_empty(0, dtype=torch.float32),
    )


# --------------------------------------------------------------------------- backward


def _row_dot(a: torch.Tensor, b: torch.Tensor, ws: _Workspace) -> torch.Tensor:
    """``rowsum(a * b)``, ``(BH, R, K)`` x2 -> ``(BH, R, 1)``, through a workspace temporary."""
    return torch.mul(a, b, out=ws.get("tmp", a.shape)).sum(dim=-1, keepdim=True)


def _inverse_row_sums(x: torch.Tensor) -> torch.Tensor:
    """``1 / rowsum(x)`` as ``(BH, R, 1)`` for non-negative ``x``; 0 for all-zero rows."""
    total = x.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, total.reciprocal(), torch.zeros_like(total))


def _probabilities(
    ws: _Workspace, scores: torch.Tensor, temperature: float, dead_rows: bool, divided: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(P', r, P_T)`` of a block's masked scores (overwritten): ``softmax(S) = r * P'`` row-wise
    (``r`` None means 1) and ``P_T = softmax(S / T)``. ``dead_rows``: some rows may see no key.
    ``divided``: ``scores`` already holds ``S / T`` (the ``1 / T`` folded into the queries).

    For ``T = 2``, ``P' = P_T^2`` is proportional to ``exp(S)``; the caller folds the row factor
    ``r`` into the small ``(rows, D)`` operands instead of rescaling the block.
    """
    if temperature == 1.0:
        probs = _softmax_(scores, dead_rows)
        return probs, None, probs
    if temperature == 2.0:
        probs_t = _softmax_(scores if divided else scores.mul_(0.5), dead_rows)
        probs = torch.mul(probs_t, probs_t, out=ws.get("p", scores.shape))
        return probs, _inverse_row_sums(probs), probs_t
    if divided:
        probs = _softmax_(torch.mul(scores, temperature, out=ws.get("p", scores.shape)), dead_rows)
        return probs, None, _softmax_(scores, dead_rows)
    probs = _softmax_(ws.get("p", scores.shape).copy_(scores), dead_rows)
    return probs, None, _softmax_(scores.div_(temperature), dead_rows)


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
    """Blockwise GIM backward, recomputing ``P`` (and ``P_T``) block by block.

    Args:
        dout: ``(B, Hq, Lq, Dv)`` gradient of ``out``, any strides. q, k, v and ``out`` as given to /
            returned by :func:`forward` (``lse`` must be the forward's: its ``-inf`` rows are used, and
            for ``T = 2`` in float32 its values; ``o_t`` and ``lse_t`` are not needed). ``temperature``
            and the scales are the GIM rules (1 = ordinary gradient); the other keywords must match
            the forward call.

    Returns:
        ``(dq, dk, dv, dgate)`` shaped and typed like ``q``, ``k``, ``v`` and ``gate`` (float32
        accumulation, float64 for float64); ``dgate`` is None when ``gate`` is None.
    """
    if attention_cpu.serves(q, k, attention_mask, causal, sliding_window, softcap, temperature):
        return attention_cpu.backward(
            dout, q, k, v, lse, gate, causal=causal, scale=scale, temperature=temperature, q_scale=q_scale,
            k_scale=k_scale, v_scale=v_scale, block_rows=_kernel_block_rows(k.shape[2], q.dtype),
        )
    dtype = _compute_dtype(q.dtype)
    plan = _make_plan(q, k, causal, sliding_window, dtype)
    group, hkv = plan.group, plan.hkv
    qs = _to_rows(q, hkv, dtype).mul_(scale)
    k3, v3 = _to_kv(k, dtype), _to_kv(v, dtype)
    do = _to_rows(dout, hkv, dtype)
    gate_rows = None if gate is None else _gate_rows(gate, hkv, dtype)
    q_u, do_u = qs, do
    if gate_rows is not None:
        q_u = (_group_view(qs, group) * gate_rows).view(qs.shape)
        do_u = (_group_view(do, group) * gate_rows).view(do.shape)
    # With the ordinary softmax and no gate, rowsum(dP * P) = rowsum(dO * O): no score-sized pass.
    delta = None
    if temperature == 1.0 and gate is None:
        delta = (do * _to_rows(out, hkv, dtype)).sum(dim=-1, keepdim=True)
    dq = torch.zeros_like(qs)
    # dK and dV are accumulated transposed, (BH, D, Lk): the faster matmul layout on CPU.
    dk_t = torch.zeros((k3.shape[0], k3.shape[2], k3.shape[1]), dtype=dtype, device=q.device)
    dv_t = torch.zeros((v3.shape[0], v3.shape[2], v3.shape[1]), dtype=dtype, device=q.device)
    dgate_rows = None if gate is None else torch.zeros(qs.shape[:2], dtype=dtype, device=q.device)
    dead_rows = bool(torch.isneginf(lse).any())  # rows that saw no key in the forward
    # Without softcap, 1 / T is folded into the queries that make the scores: S / T with no pass.
    divided = softcap is None and temperature != 1.0
    # T = 2 in float32 with every row alive: E = exp(S / 2 - LSE / 2) needs no softmax, E^2 = P exactly
    # and P_T = E / rowsum(E); that row factor goes to the small dQ rows and q_u rows, not the block.
    # E is computed as 2^x (a much faster kernel than exp), x = log2(e) (S - LSE) / 2, with log2(e) / 2
    # folded into the queries and -log2(e) LSE / 2 added inside the score matmul.
    bias = None
    factor = 1.0 / temperature if divided else 1.0
    # A row whose LSE is near float32's min (an additive mask of finfo.min, as HF builds for ALiBi) would
    # overflow in -LSE / 2 + S / 2: such rows take the ordinary path.
    if divided and temperature == 2.0 and dtype == torch.float32 and not dead_rows and bool((lse > -1e30).all()):
        factor = 0.5 / math.log(2.0)
        bias = _to_rows(lse.unsqueeze(-1), hkv, dtype).mul_(-factor)
    q_scores = qs * factor if factor != 1.0 else qs
    ws = _Workspace(dtype, q.device)
    masker = _Masker(plan, attention_mask, dtype, factor)
    for block in plan.blocks():
        i0, i1, lo, hi = block
        rows = slice(i0 * group, i1 * group)
        scores, tanh = _block_scores(ws, q_scores, k3, masker, block, group, softcap, bias)
        t_factor = None  # P_T = t_factor * probs_t row-wise (None means 1)
        if bias is not None:
            probs_t = scores.exp2_()
            # Without a gate, P shares dP's buffer: it is dead once dV is accumulated, before dP exists.
            p_name = "p" if dgate_rows is not None else "dp"
            probs, row_factor = torch.mul(probs_t, probs_t, out=ws.get(p_name, scores.shape)), None
            t_factor = probs_t.sum(dim=-1, keepdim=True).reciprocal_()
        else:
            probs, row_factor, probs_t = _probabilities(ws, scores, temperature, dead_rows, divided)
        do_rows = do_u[:, rows] if row_factor is None else do_u[:, rows] * row_factor
        dv_t[:, :, lo:hi].baddbmm_(do_rows.transpose(1, 2), probs)
        dprobs = torch.bmm(do[:, rows], v3[:, lo:hi].transpose(1, 2), out=ws.get("dp", probs.shape))
        if dgate_rows is not None:
            row_dot = _row_dot(dprobs, probs, ws)
            dgate_rows[:, rows] = (row_dot if row_factor is None else row_dot * row_factor).squeeze(-1)
        if delta is not None:
            dscores = dprobs.sub_(delta[:, rows]).mul_(probs_t)
        elif dgate_rows is not None and probs_t is probs:
            dscores = dprobs.sub_(row_dot).mul_(probs_t)
        else:
            # P_T dP - rowsum(P_T dP) P_T: two passes over the block, then the row sums.
            dprobs.mul_(probs_t)
            row_delta = dprobs.sum(dim=-1, keepdim=True)
            if t_factor is not None:
                row_delta.mul_(t_factor)
            dscores = dprobs.addcmul_(probs_t, row_delta, value=-1.0)
        if tanh is not None:
            dscores.mul_(tanh.mul_(tanh).neg_().add_(1.0))
        torch.bmm(dscores, k3[:, lo:hi], out=dq[:, rows])
        q_rows = q_u[:, rows]
        if t_factor is not None:  # dS = t_factor * dscores
            dq[:, rows].mul_(t_factor)
            q_rows = q_rows * t_factor
        dk_t[:, :, lo:hi].baddbmm_(q_rows.transpose(1, 2), dscores)
    dq.mul_(scale * q_scale)
    if gate_rows is not None:
        _group_view(dq, group).mul_(gate_rows)
    dgate = None
    if dgate_rows is not None:
        dgate = dgate_rows.view(plan.batch, hkv, plan.lq, group).sum(dim=2).reshape(gate.shape).to(gate.dtype)
    return (
        _to_heads(dq, plan.batch, group, q.dtype),
        _kv_grad(dk_t, k_scale, k),
        _kv_grad(dv_t, v_scale, v),
        dgate,
    )


def _kernel_block_rows(lk: int, dtype: torch.dtype) -> int:
    """Query rows per block of the C++ kernel: its two per-head ``(rows, Lk)`` tiles within the budget."""
    per_row = 2 * lk * torch.finfo(_compute_dtype(dtype)).bits // 8
    return max(MIN_BLOCK_ROWS, BLOCK_BUDGET_BYTES // per_row)


def _kv_grad(grad_t: torch.Tensor, grad_scale: float, like: torch.Tensor) -> torch.Tensor:
    """Transposed ``(BH, D, Lk)`` accumulator -> scaled, contiguous gradient shaped and typed like ``like``."""
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    out.view(grad_t.shape[0], grad_t.shape[2], grad_t.shape[1]).copy_(grad_t.mul_(grad_scale).transpose(1, 2))
    return out
