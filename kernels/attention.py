"""Triton kernels: flash-attention forward and the GIM backward.

Semantics are those of :mod:`fastgim.ops.attention_reference` (masks, bottom-right causal
alignment, sliding window, softcap, per-(batch, head) gate, GIM temperature backward and
gradient scales). Inputs may be any strided views; outputs are allocated contiguous.

Kernels
-------
``_fwd_kernel``
    Programs over (query block, batch * query head); online softmax over the key blocks that
    causality / the window leave visible (fully masked blocks are skipped), LSE saved; blocks
    that need no mask run without one. With
    ``STATS`` (option A below) it also accumulates ``O_T = softmax(S / T) V`` and ``LSE_T``.
``_bwd_dq_kernel``
    Programs over (query block, batch * query head). Computes the row vector the softmax
    backward needs (``D = rowsum(dO * O)`` or ``D_T = rowsum(dO_eff * O_T)``), stores it for the
    dK/dV kernel, then loops over key blocks accumulating ``dQ = dS K``. With option B it first
    runs a stats loop over the key blocks computing ``m_T, l_T`` (so ``LSE_T``) and
    ``u = sum_j exp(S/T - m_T) dP`` (so ``D_T = u / l_T``) without keeping any tile.
``_bwd_dkdv_kernel``
    FlashAttention-2 order: programs over (key block, batch * kv head); the inner loops run over
    the query heads of the GQA group and their query blocks, so dK / dV are accumulated in
    registers and reduced over the group without repeating K / V. The gate gradient
    ``sum(P * (dO V^T))`` is accumulated here and added with one fp32 atomic per head and block,
    which is exact also when the gate is 0.

GIM statistics: option A vs option B
------------------------------------
Counting matmul units (one ``BLOCK_M x BLOCK_N x D`` product) and exponentials per score
element for one forward + backward with GIM active (T != 1), dQ computed by its own kernel
(deterministic, no atomics, as in Triton's fused-attention tutorial):

* plain flash attention: forward QK^T, PV (2); dQ kernel QK^T, dO V^T, dS K (3); dK/dV kernel
  QK^T, dO V^T, P^T dO, dS^T Q (4) -> 9 units; exps 1 + 1 + 1 = 3.
* option A (``STATS_IN_FORWARD = True``): forward adds ``P_T V`` (3 units, 2 exps: P and P_T);
  the dQ kernel needs only P_T (1 exp), the dK/dV kernel P (for dV) and P_T (for dS) (2 exps)
  -> 10 units, 5 exps, plus ``O_T`` (B, Hq, Lq, Dv) kept for the backward (linear memory).
* option B (``STATS_IN_FORWARD = False``): stock forward (2 units, 1 exp); stats loop
  QK^T, dO V^T (2 units, 1 exp); dQ 3 units 1 exp; dK/dV 4 units 2 exps -> 11 units, 5 exps,
  no extra memory.

Both need the same 5 exponentials per element (MUFU-bound on Hopper at small head_dim), A saves
one matmul unit (~10 % of the total) and one pass over K/V, so A is the default. B is
kept for memory-tight cases and selectable with ``FASTGIM_GIM_STATS=backward``. These counts
are analytic; GPU timings of both are owed (no GPU was available when this was written).

The forward splits its key loop into masked (window edge, causal diagonal, tail) and unmasked
interior blocks when there is no padding / dense mask, so interior blocks skip the mask ALU work.
Tuning still owed on a GPU: the same split in the two backward kernels; dQ by fp32 atomics from the
dK/dV kernel would save one matmul unit per backward (7 instead of 9 plain) at the cost of
determinism.

Launch: every grid is flat and 1-D (``cdiv(length, BLOCK) * batch * heads`` programs on axis 0, blocks
of one head adjacent), so batch x heads is not capped at 65535; offsets derived from (batch, head) and
row offsets (row x stride, also for dense masks) are 64-bit, so long inputs do not overflow; each launch
runs under ``torch.cuda.device`` of its tensors; lengths are not specialised (no recompiles per
``L % 16``). Config tables are per kernel variant (``config_variant``) and the autotune key holds every
constexpr, so GIM launches never reuse a config tuned for a plain launch; ``benchmarks/compile_report.py``
compiles them all ahead of time (registers, spills, shared memory) and ``tests/test_aot.py`` guards them.

Interpreter notes: softcap's tanh is written with ``exp`` (no libdevice), atomics are fp32 only,
and one small fixed block config is used instead of autotuning.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastgim.kernels.launch import device_guard

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Lengths are not specialised (divisibility by 16, == 1): each distinct value class would compile again,
# and they only bound masks. LQ_KEY / LK_KEY (powers of two) are the autotune key.
_NO_SPECIALIZE = ["Lq", "Lk", "LQ_KEY", "LK_KEY"]

MASK_NONE = 0
MASK_BOOL = 1
MASK_ADD = 2


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _tanh(x):
    """tanh with exp only: an odd Taylor polynomial near 0 (no cancellation), exp form elsewhere."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    near = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.125, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _tile(base, rows, cols, stride_r, stride_c):
    """Pointers ``base[rows, cols]``; row offsets in 64 bits (rows x stride passes 2^31 for long inputs)."""
    return base + rows[:, None].to(tl.int64) * stride_r + cols[None, :] * stride_c


@triton.jit
def _program(length, BLOCK: tl.constexpr):
    """(block index, batch * head index as int64) of a flat 1-D grid of ``cdiv(length, BLOCK) * heads``
    programs (axis 0 holds 2^31 - 1 programs, the other axes only 65535); blocks of one head are adjacent."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(length, BLOCK)
    return pid % n_blocks, (pid // n_blocks).to(tl.int64)


@triton.jit
def _scores(
    q, k, offs_m, offs_n, b, h, Lq, Lk, scale, softcap, window,
    Pad, stride_pb, Mask, smb, smh, smq, smk,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_PAD: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
):
    """Masked scores ``S`` (BLOCK_M, BLOCK_N) fp32 (-inf where not allowed) and the softcap tanh."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    t = s
    if HAS_SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    in_k = offs_n < Lk
    if MASK_KIND == 2:
        ptrs = _tile(Mask + b * smb + h * smh, offs_m, offs_n, smq, smk)
        bounds = (offs_m[:, None] < Lq) & in_k[None, :]
        s = s + tl.load(ptrs, mask=bounds, other=0.0).to(tl.float32)
    keep = in_k[None, :]  # (1, BLOCK_N); broadcasts against the 2D conditions
    if IS_CAUSAL or HAS_WINDOW:
        pos = offs_m[:, None] + (Lk - Lq)
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= pos)
        if HAS_WINDOW:
            keep = keep & (offs_n[None, :] > pos - window)
            if not IS_CAUSAL:
                keep = keep & (offs_n[None, :] < pos + window)
    if HAS_PAD:
        pad = tl.load(Pad + b * stride_pb + offs_n, mask=in_k, other=0)
        keep = keep & (pad != 0)[None, :]
    if MASK_KIND == 1:
        ptrs = _tile(Mask + b * smb + h * smh, offs_m, offs_n, smq, smk)
        bounds = (offs_m[:, None] < Lq) & in_k[None, :]
        keep = keep & (tl.load(ptrs, mask=bounds, other=0) != 0)
    s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _key_range(start_m, Lq, Lk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key range [lo, hi) a query block can see; lo is a multiple of BLOCK_N."""
    shift = Lk - Lq
    lo = 0
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M + shift)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m + shift - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
        if not IS_CAUSAL:
            hi = tl.minimum(Lk, start_m + BLOCK_M - 1 + shift + window)
    return lo, hi


@triton.jit
def _query_range(start_n, Lq, Lk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query range [lo, hi) that can see a key block; lo is a multiple of BLOCK_M."""
    shift = Lk - Lq
    lo = 0
    hi = Lq
    if IS_CAUSAL:
        lo = tl.maximum(0, start_n - shift)
    if HAS_WINDOW:
        hi = tl.minimum(Lq, start_n + BLOCK_N + window - 1 - shift)
        if not IS_CAUSAL:
            lo = tl.maximum(0, start_n - window + 1 - shift)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


# --------------------------------------------------------------------------- forward


@triton.jit
def _unmasked_key_range(start_m, lo, hi, Lq, Lk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Block-aligned [full_lo, full_hi) inside [lo, hi) whose keys every row of the query block sees."""
    shift = Lk - Lq
    full_lo = lo
    full_hi = (Lk // BLOCK_N) * BLOCK_N  # the tail block is masked
    if IS_CAUSAL:  # n + BLOCK_N - 1 <= start_m + shift (the block's first row)
        full_hi = tl.minimum(full_hi, (tl.maximum(start_m + shift + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:  # n > last_pos - window
        first = tl.maximum(start_m + BLOCK_M + shift - window, 0)
        full_lo = tl.maximum(full_lo, ((first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
        if not IS_CAUSAL:  # n + BLOCK_N - 1 < start_m + shift + window
            full_hi = tl.minimum(full_hi, (tl.maximum(start_m + shift + window, 0) // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return full_lo, full_hi


@triton.jit
def _fwd_blocks(
    m_i, l_i, acc, m_t, l_t, acc_t, q, k_base, v_base, offs_m, offs_d, offs_dv, lo, hi, b, h,
    skn, skd, svn, svd, Lq, Lk, D, DV, scale, softcap, window, temperature,
    Pad, stride_pb, Mask, smb, smh, smq, smk, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_PAD: tl.constexpr, MASK_KIND: tl.constexpr,
    STATS: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr,
):
    """Online-softmax update of ``(m, l, acc, m_T, l_T, acc_T)`` over key blocks [lo, hi).

    The state travels as separate values, not a tuple: Triton before 3.3 cannot pass tuples to jit functions."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = tl.load(_tile(k_base, offs_n, offs_d, skn, skd),
                        mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
            v = tl.load(_tile(v_base, offs_n, offs_dv, svn, svd),
                        mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0)
            s, _t = _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, scale, softcap, window,
                            Pad, stride_pb, Mask, smb, smh, smq, smk,
                            IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_PAD, MASK_KIND, PREC)
        else:
            k = tl.load(_tile(k_base, offs_n, offs_d, skn, skd),
                        mask=offs_d[None, :] < D, other=0.0)
            v = tl.load(_tile(v_base, offs_n, offs_dv, svn, svd),
                        mask=offs_dv[None, :] < DV, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            if HAS_SOFTCAP:
                s = softcap * _tanh(s / softcap)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
        if STATS:
            st = s / temperature
            mt_new = tl.maximum(m_t, tl.max(st, 1))
            mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
            alpha_t = tl.exp(m_t - mt_safe)
            p_t = tl.exp(st - mt_safe[:, None])
            l_t = l_t * alpha_t + tl.sum(p_t, 1)
            acc_t = acc_t * alpha_t[:, None] + tl.dot(p_t.to(v.dtype), v, input_precision=PREC)
            m_t = mt_new
    return m_i, l_i, acc, m_t, l_t, acc_t


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(
    Q, K, V, Out, Lse, OT, LseT, Gate, Pad, Mask,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    stride_pb, smb, smh, smq, smk,
    Hq, GROUP, Lq, Lk, D, DV, scale, softcap, window, temperature,
    LQ_KEY, LK_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_PAD: tl.constexpr, MASK_KIND: tl.constexpr, HAS_GATE: tl.constexpr, STATS: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_m, pid_bh = _program(Lq, BLOCK_M)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd),
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc_t = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    lo, hi = _key_range(start_m, Lq, Lk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_PAD or MASK_KIND != 0:
        m_i, l_i, acc, m_t, l_t, acc_t = _fwd_blocks(
            m_i, l_i, acc, m_t, l_t, acc_t, q, k_base, v_base, offs_m, offs_d, offs_dv, lo, hi, b, h,
            skn, skd, svn, svd, Lq, Lk, D, DV, scale, softcap, window, temperature,
            Pad, stride_pb, Mask, smb, smh, smq, smk, BLOCK_N, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_PAD, MASK_KIND, STATS, PREC, True,
        )
    else:  # interior blocks need no mask: three ranges, masked / unmasked / masked
        full_lo, full_hi = _unmasked_key_range(start_m, lo, hi, Lq, Lk, window, BLOCK_M, BLOCK_N,
                                               IS_CAUSAL, HAS_WINDOW)
        m_i, l_i, acc, m_t, l_t, acc_t = _fwd_blocks(
            m_i, l_i, acc, m_t, l_t, acc_t, q, k_base, v_base, offs_m, offs_d, offs_dv, lo, full_lo, b, h,
            skn, skd, svn, svd, Lq, Lk, D, DV, scale, softcap, window, temperature,
            Pad, stride_pb, Mask, smb, smh, smq, smk, BLOCK_N, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_PAD, MASK_KIND, STATS, PREC, True,
        )
        m_i, l_i, acc, m_t, l_t, acc_t = _fwd_blocks(
            m_i, l_i, acc, m_t, l_t, acc_t, q, k_base, v_base, offs_m, offs_d, offs_dv, full_lo, full_hi, b, h,
            skn, skd, svn, svd, Lq, Lk, D, DV, scale, softcap, window, temperature,
            Pad, stride_pb, Mask, smb, smh, smq, smk, BLOCK_N, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_PAD, MASK_KIND, STATS, PREC, False,
        )
        m_i, l_i, acc, m_t, l_t, acc_t = _fwd_blocks(
            m_i, l_i, acc, m_t, l_t, acc_t, q, k_base, v_base, offs_m, offs_d, offs_dv, full_hi, hi, b, h,
            skn, skd, svn, svd, Lq, Lk, D, DV, scale, softcap, window, temperature,
            Pad, stride_pb, Mask, smb, smh, smq, smk, BLOCK_N, IS_CAUSAL, HAS_WINDOW,
            HAS_SOFTCAP, HAS_PAD, MASK_KIND, STATS, PREC, True,
        )

    row = pid_bh * Lq + offs_m
    in_q = offs_m < Lq
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_GATE:
        out = out * tl.load(Gate + pid_bh).to(tl.float32)
    out_mask = in_q[:, None] & (offs_dv[None, :] < DV)
    tl.store(Out + row[:, None] * DV + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=out_mask)
    tl.store(Lse + row, tl.where(empty, float("-inf"), m_i + tl.log(l_safe)), mask=in_q)
    if STATS:
        empty_t = l_t == 0.0
        lt_safe = tl.where(empty_t, 1.0, l_t)
        out_t = acc_t / lt_safe[:, None]
        tl.store(OT + row[:, None] * DV + offs_dv[None, :], out_t.to(OT.dtype.element_ty), mask=out_mask)
        tl.store(LseT + row, tl.where(empty_t, float("-inf"), m_t + tl.log(lt_safe)), mask=in_q)


# --------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel(
    Q, K, V, DO, Out, Lse, OT, LseT, Delta, DQ, Gate, Pad, Mask,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    stride_pb, smb, smh, smq, smk,
    Hq, GROUP, Lq, Lk, D, DV, scale, softcap, window, temperature, dq_factor,
    LQ_KEY, LK_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_PAD: tl.constexpr, MASK_KIND: tl.constexpr, HAS_GATE: tl.constexpr, GIM: tl.constexpr,
    STATS_FROM_FWD: tl.constexpr, PREC: tl.constexpr,
):
    pid_m, pid_bh = _program(Lq, BLOCK_M)
    b = pid_bh // Hq
    h = pid_bh % Hq
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    in_q = offs_m < Lq
    row = pid_bh * Lq + offs_m
    q = tl.load(_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd),
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(_tile(DO + b * sdb + h * sdh, offs_m, offs_dv, sdm, sdd),
                 mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV), other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    g = 1.0
    if HAS_GATE:
        g = tl.load(Gate + pid_bh).to(tl.float32)
    o_mask = in_q[:, None] & (offs_dv[None, :] < DV)
    lo, hi = _key_range(start_m, Lq, Lk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)

    if GIM:
        if STATS_FROM_FWD:
            o_t = tl.load(OT + row[:, None] * DV + offs_dv[None, :], mask=o_mask, other=0.0)
            delta = g * tl.sum(do.to(tl.float32) * o_t.to(tl.float32), 1)
            lse = tl.load(LseT + row, mask=in_q, other=0.0)
        else:
            m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_t = tl.zeros([BLOCK_M], tl.float32)
            u = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                k = tl.load(_tile(k_base, offs_n, offs_d, skn, skd),
                            mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
                v = tl.load(_tile(v_base, offs_n, offs_dv, svn, svd),
                            mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0)
                s, _t = _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, scale, softcap, window,
                                Pad, stride_pb, Mask, smb, smh, smq, smk,
                                IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_PAD, MASK_KIND, PREC)
                st = s / temperature
                mt_new = tl.maximum(m_t, tl.max(st, 1))
                mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
                alpha = tl.exp(m_t - mt_safe)
                p_t = tl.exp(st - mt_safe[:, None])
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                l_t = l_t * alpha + tl.sum(p_t, 1)
                u = u * alpha + tl.sum(p_t * dp, 1)
                m_t = mt_new
            empty_t = l_t == 0.0
            lt_safe = tl.where(empty_t, 1.0, l_t)
            delta = g * u / lt_safe
            lse = tl.where(empty_t, float("-inf"), m_t + tl.log(lt_safe))
            tl.store(LseT + row, lse, mask=in_q)
    else:
        o = tl.load(Out + row[:, None] * DV + offs_dv[None, :], mask=o_mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(Lse + row, mask=in_q, other=0.0)
    tl.store(Delta + row, delta, mask=in_q)
    lse = tl.where(lse == float("-inf"), 0.0, lse)

    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(_tile(k_base, offs_n, offs_d, skn, skd),
                    mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(_tile(v_base, offs_n, offs_dv, svn, svd),
                    mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0)
        s, t = _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, scale, softcap, window,
                       Pad, stride_pb, Mask, smb, smh, smq, smk,
                       IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_PAD, MASK_KIND, PREC)
        if GIM:
            s = s / temperature
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if HAS_GATE:
            dp = dp * g
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq_mask = in_q[:, None] & (offs_d[None, :] < D)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * dq_factor).to(DQ.dtype.element_ty), mask=dq_mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, LseT, Delta, DK, DV_out, DGate, Gate, Pad, Mask,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    stride_pb, smb, smh, smq, smk,
    Hq, Hkv, GROUP, Lq, Lk, D, DV, scale, softcap, window, temperature, dk_factor, dv_factor,
    LQ_KEY, LK_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_PAD: tl.constexpr, MASK_KIND: tl.constexpr, HAS_GATE: tl.constexpr, GIM: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_n, pid_bkv = _program(Lk, BLOCK_N)
    b = pid_bkv // Hkv
    kvh = pid_bkv % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k = tl.load(_tile(K + b * skb + kvh * skh, offs_n, offs_d, skn, skd),
                mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(_tile(V + b * svb + kvh * svh, offs_n, offs_dv, svn, svd),
                mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    lo, hi = _query_range(start_n, Lq, Lk, window, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for gi in range(0, GROUP):
        h = kvh * GROUP + gi
        bh = b * Hq + h
        g = 1.0
        if HAS_GATE:
            g = tl.load(Gate + bh).to(tl.float32)
        dgate = tl.sum(tl.zeros([BLOCK_M], tl.float32), 0)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_q = offs_m < Lq
            row = bh * Lq + offs_m
            q = tl.load(_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd),
                        mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
            do = tl.load(_tile(DO + b * sdb + h * sdh, offs_m, offs_dv, sdm, sdd),
                         mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV), other=0.0)
            lse = tl.load(Lse + row, mask=in_q, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(Delta + row, mask=in_q, other=0.0)
            s, t = _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, scale, softcap, window,
                           Pad, stride_pb, Mask, smb, smh, smq, smk,
                           IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_PAD, MASK_KIND, PREC)
            p = tl.exp(s - lse[:, None])
            # dV first, then dP: fewer (BLOCK_M, BLOCK_N) tiles live at once (register pressure)
            if HAS_GATE:
                dv += tl.dot(tl.trans((p * g).to(do.dtype)), do, input_precision=PREC)
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if HAS_GATE:
                dgate += tl.sum(tl.sum(p * dp, 1), 0)
                dp = dp * g
            if GIM:
                lse_t = tl.load(LseT + row, mask=in_q, other=0.0)
                lse_t = tl.where(lse_t == float("-inf"), 0.0, lse_t)
                p = tl.exp(s / temperature - lse_t[:, None])
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        if HAS_GATE:
            tl.atomic_add(DGate + bh, dgate)
    row_n = pid_bkv * Lk + offs_n
    in_k = offs_n < Lk
    tl.store(DK + row_n[:, None] * D + offs_d[None, :], (dk * dk_factor).to(DK.dtype.element_ty),
             mask=in_k[:, None] & (offs_d[None, :] < D))
    tl.store(DV_out + row_n[:, None] * DV + offs_dv[None, :], (dv * dv_factor).to(DV_out.dtype.element_ty),
             mask=in_k[:, None] & (offs_dv[None, :] < DV))


# --------------------------------------------------------------------------- configs and launch

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU generation (sm_90+ / sm_80-89), kernel, variant
# (``config_variant``) and padded head_dim. Each kernel variant has its own table because the GIM and
# extra-feature specialisations hold more live tiles (option A's forward a second accumulator, the dK/dV
# kernel a probability tile more; softcap / masks / gate further tiles) and spill in configs that suit the
# plain kernels. Chosen from ahead-of-time compiles (benchmarks/compile_report.py, Triton 3.9): at head_dim
# 64 and 128 every offered config compiles without register spills for sm_80 and sm_90, fp16, in every
# feature set (head_dim 64 uses the head_dim-128 configs, pruned on sm_80 where ptxas spills them). The dK/dV kernel keeps K, V, dK and dV of BLOCK_N keys
# in registers, which only fits 32 x 64 blocks on 8 warps (and smaller) at head_dim 128; with the extra
# features it needs num_stages=1. Every head_dim <= 128 table has a config within 99 KiB of shared memory.
# Head_dim 256 tables (plus the common fallback) are not spill-free (see the report).
_SMALL = (32, 32, 4, 1)  # fits 99 KiB of shared memory (consumer GPUs) where the others do not
_D128_DKDV = [(32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2)]
_D128_DKDV_EXTRAS = [(32, 64, 8, 1), _SMALL]
_SM90_D128 = {
    ("fwd", "plain"): [(128, 64, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), _SMALL],
    ("fwd", "stats"): [(64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 4, 3), _SMALL],
    ("dq", "plain"): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3), _SMALL],
    ("dq", "stats"): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],  # _SMALL spills in option B
    ("dkdv", "plain"): _D128_DKDV, ("dkdv", "gim"): _D128_DKDV,
    ("dkdv", "plain+extras"): _D128_DKDV_EXTRAS, ("dkdv", "gim+extras"): _D128_DKDV_EXTRAS,
}
_SM80_D128 = {
    ("fwd", "plain"): [(64, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), _SMALL],
    ("fwd", "stats"): [(64, 64, 8, 2), (32, 64, 4, 3), (64, 32, 8, 2), _SMALL],
    ("dq", "plain"): [(64, 64, 8, 2), (64, 128, 8, 2), (64, 32, 4, 3)],  # _SMALL spills (128 registers)
    ("dq", "stats"): [(64, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2), _SMALL],
    ("dq", "stats+extras"): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 4, 2), _SMALL],
    ("dkdv", "plain"): _D128_DKDV, ("dkdv", "gim"): _D128_DKDV,
    ("dkdv", "plain+extras"): _D128_DKDV_EXTRAS, ("dkdv", "gim+extras"): _D128_DKDV_EXTRAS,
}
_SM80_D64_DKDV_EXTRAS = [(32, 32, 4, 2), (16, 32, 4, 1)]
_SM90_D256 = {
    ("fwd", "plain"): [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    ("fwd", "stats"): [(64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2)],
    ("dq", "plain"): [(64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 1)],
    ("dkdv", "plain"): [(32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
    ("dkdv", "gim"): [(16, 64, 4, 1), (32, 32, 4, 2), (16, 32, 4, 1)],
}
_SM80_D256 = {
    ("fwd", "plain"): [(64, 32, 4, 2), (64, 64, 8, 1), (32, 32, 4, 2)],
    ("fwd", "stats"): [(32, 32, 4, 2), (64, 32, 8, 1), (32, 64, 4, 1)],
    ("dq", "plain"): [(32, 32, 4, 2), (64, 32, 8, 1), (32, 64, 4, 1)],
    ("dkdv", "plain"): [(32, 32, 4, 2), (32, 64, 4, 1), (16, 64, 4, 1)],
    ("dkdv", "gim"): [(16, 64, 4, 1), (32, 32, 4, 2), (16, 32, 4, 1)],
}


# sm_80 at head_dim 64: ptxas spills some head_dim-128 configs there (other layouts per tile)
_SM80_D64 = {
    **_SM80_D128,
    ("fwd", "plain+extras"): [(64, 64, 4, 3), (64, 32, 4, 3), _SMALL],
    ("fwd", "stats"): [(32, 64, 4, 3), (64, 32, 8, 2), _SMALL],
    ("dq", "plain"): [(64, 64, 8, 2), (64, 32, 4, 3)],
    ("dq", "plain+extras"): [(64, 32, 4, 3), _SMALL],
    ("dkdv", "plain+extras"): _SM80_D64_DKDV_EXTRAS,
    ("dkdv", "gim+extras"): _SM80_D64_DKDV_EXTRAS,
}


def _by_bucket(d64: dict, d128: dict, d256: dict) -> dict:
    keys = set(d64) | set(d128)
    return {key: {**({64: d64[key]} if key in d64 else {}), **({128: d128[key]} if key in d128 else {}),
                  **({256: d256[key]} if key in d256 else {})} for key in keys}


_TABLES = {9: _by_bucket(_SM90_D128, _SM90_D128, _SM90_D256), 8: _by_bucket(_SM80_D64, _SM80_D128, _SM80_D256)}
# float32 tiles take twice the registers and shared memory: small blocks only. The last one also fits
# consumer GPUs' 99 KiB of shared memory at head_dim 256.
_FP32 = {64: [(64, 32, 4, 2), (32, 32, 4, 1)], 128: [(32, 32, 4, 2), (32, 32, 4, 1)],
         256: [(32, 32, 4, 1), (16, 32, 4, 1)]}
# Appended to the head_dim 256 tables: fits the shared memory of any supported GPU.
_FALLBACK = (32, 32, 4, 1)
_INTERPRET_BLOCKS = (32, 32)
_KERNELS = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}
_TUNE_KEY_COMMON = ["LQ_KEY", "LK_KEY", "D_PAD", "DV_PAD", "GROUP", "IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP",
                    "HAS_PAD", "MASK_KIND", "HAS_GATE", "PREC"]
# Every constexpr that changes the kernel (except the tuned block sizes) is in its autotune key, so a
# config tuned for a plain call is never reused for a GIM call of other register pressure.
TUNE_KEYS = {"fwd": _TUNE_KEY_COMMON + ["STATS"], "dq": _TUNE_KEY_COMMON + ["GIM", "STATS_FROM_FWD"],
             "dkdv": _TUNE_KEY_COMMON + ["GIM"]}
MAX_PROGRAMS = 2**31 - 1  # grid axis 0
_TUNED: dict = {}


def config_variant(kind: str, *, dtype: str, stats: bool, gim: bool, stats_from_fwd: bool,
                   extras: bool = False) -> str:
    """Which config table a launch uses: ``fp32``, or per kernel ``plain`` / ``stats`` (forward with
    option A's statistics; dQ kernel with option B's stats loop) / ``gim`` (dK/dV kernel with GIM), with
    ``+extras`` when softcap, key padding, a dense mask or a gate add live tiles (their own table if any)."""
    if dtype == "fp32":
        return "fp32"
    if kind == "fwd":
        base = "stats" if stats else "plain"
    elif kind == "dq":
        base = "stats" if gim and not stats_from_fwd else "plain"
    else:
        base = "gim" if gim else "plain"
    return base + "+extras" if extras else base


def config_table(kind: str, d_pad: int, capability: tuple[int, int], variant: str) -> list:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) configs the autotuner may pick."""
    bucket = 64 if d_pad <= 64 else 128 if d_pad <= 128 else 256
    if variant == "fp32":
        return list(_FP32[bucket])
    tables = _TABLES[9 if capability[0] >= 9 else 8]
    base = variant.split("+")[0]
    key = next(k for k in ((kind, variant), (kind, base), (kind, "plain")) if k in tables and bucket in tables[k])
    table = list(tables[key][bucket])
    return table + [_FALLBACK] if bucket == 256 and _FALLBACK not in table else table


def _kernel(kind: str, d_pad: int, device: torch.device, variant: str):
    """The kernel to launch and the fixed block meta-parameters (empty when autotuned)."""
    if INTERPRET or device.type != "cuda":
        return _KERNELS[kind], {"BLOCK_M": _INTERPRET_BLOCKS[0], "BLOCK_N": _INTERPRET_BLOCKS[1]}
    capability = torch.cuda.get_device_capability(device)
    cache_key = (kind, d_pad, capability, variant)
    if cache_key not in _TUNED:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                   for bm, bn, w, st in config_table(kind, d_pad, capability, variant)]
        reset = ["DGate"] if kind == "dkdv" else None
        # configs that do not fit the device's shared memory are skipped by the autotuner
        _TUNED[cache_key] = triton.autotune(configs=configs, key=TUNE_KEYS[kind], reset_to_zero=reset)(
            _KERNELS[kind])
    return _TUNED[cache_key], {}


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def _extras(pad, mask, gate, softcap) -> bool:
    return pad is not None or mask is not None or gate is not None or softcap is not None


def flat_grid(length: int, heads: int, block: str):
    """Grid function of the flat 1-D grid ``cdiv(length, BLOCK) * heads`` (see ``_program``)."""

    def grid(meta: dict) -> tuple[int]:
        programs = triton.cdiv(length, meta[block]) * heads
        if programs > MAX_PROGRAMS:
            raise ValueError(f"attention of {heads} batch x heads at length {length} needs {programs} programs, "
                             f"more than a CUDA grid holds ({MAX_PROGRAMS}); split the batch")
        return (programs,)

    return grid


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def _mask_args(pad: torch.Tensor | None, mask: torch.Tensor | None, q: torch.Tensor):
    """Pointers, strides and flags for the key-padding and dense masks (bool viewed as uint8)."""
    pad_t = q.new_empty(1, dtype=torch.uint8) if pad is None else pad.view(torch.uint8)
    stride_pb = 0 if pad is None else pad.stride(0)
    if mask is None:
        return pad_t, stride_pb, q.new_empty(1), (0, 0, 0, 0), MASK_NONE
    kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
    mask_t = mask.view(torch.uint8) if kind == MASK_BOOL else mask
    strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    return pad_t, stride_pb, mask_t, strides, kind


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    pad: torch.Tensor | None, mask: torch.Tensor | None, gate: torch.Tensor | None,
    causal: bool, scale: float, window: int | None, softcap: float | None,
    temperature: float, stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides.

    ``pad`` is a (B, Lk) bool key-padding mask, ``mask`` a 4D bool / additive mask broadcastable to
    (B, Hq, Lq, Lk), ``gate`` (B, Hq). Returns ``(out, lse, o_t, lse_t)``: out (B, Hq, Lq, Dv) in q's
    dtype, lse (B, Hq, Lq) fp32, and with ``stats`` O_T (q's dtype) and LSE_T (fp32), else empty.
    """
    batch, hq, lq, dim = q.shape
    hkv, lk, dim_v = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(batch, hq, lq, dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, hq, lq, dtype=torch.float32, device=q.device)
    o_t = torch.empty_like(out) if stats else q.new_empty(0)
    lse_t = torch.empty_like(lse) if stats else lse.new_empty(0)
    pad_t, stride_pb, mask_t, ms, mask_kind = _mask_args(pad, mask, q)
    gate_t = gate if gate is not None else lse
    d_pad, dv_pad = _pow2(dim), _pow2(dim_v)
    variant = config_variant("fwd", dtype=_dtype_name(q.dtype), stats=stats, gim=False, stats_from_fwd=False,
                             extras=_extras(pad, mask, gate, softcap))
    kernel, meta = _kernel("fwd", max(d_pad, dv_pad), q.device, variant)
    with device_guard(q):
        kernel[flat_grid(lq, batch * hq, "BLOCK_M")](
            q, k, v, out, lse, o_t if stats else out, lse_t if stats else lse, gate_t, pad_t, mask_t,
            *q.stride(), *k.stride(), *v.stride(), stride_pb, *ms,
            hq, hq // hkv, lq, lk, dim, dim_v, scale, softcap or 1.0, window or 1, temperature,
            _pow2(lq), _pow2(lk),
            D_PAD=d_pad, DV_PAD=dv_pad, IS_CAUSAL=causal, HAS_WINDOW=window is not None,
            HAS_SOFTCAP=softcap is not None, HAS_PAD=pad is not None, MASK_KIND=mask_kind,
            HAS_GATE=gate is not None, STATS=stats, PREC=_precision(q.dtype), **meta,
        )
    return out, lse, o_t, lse_t


def flash_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, o_t: torch.Tensor, lse_t: torch.Tensor, *,
    pad: torch.Tensor | None, mask: torch.Tensor | None, gate: torch.Tensor | None,
    causal: bool, scale: float, window: int | None, softcap: float | None,
    temperature: float, q_scale: float, k_scale: float, v_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward; returns ``(dq, dk, dv, dgate)`` shaped like q, k, v, gate (dgate None without gate).

    ``out`` and ``lse`` come from :func:`flash_forward` (contiguous). With GIM (temperature != 1),
    non-empty ``o_t`` / ``lse_t`` select option A; empty ones make the dQ kernel run the stats loop
    (option B). ``dout`` (B, Hq, Lq, Dv) may be any strided view.
    """
    batch, hq, lq, dim = q.shape
    hkv, lk, dim_v = k.shape[1], k.shape[2], v.shape[3]
    gim = temperature != 1.0
    from_fwd = gim and o_t.numel() > 0
    delta = torch.empty(batch, hq, lq, dtype=torch.float32, device=q.device)
    if gim and not from_fwd:
        lse_t = torch.empty_like(delta)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # Its own zeroed buffer even without a gate: the autotuner resets DGate to zero between runs.
    dgate = torch.zeros(batch, hq, dtype=torch.float32, device=q.device)
    pad_t, stride_pb, mask_t, ms, mask_kind = _mask_args(pad, mask, q)
    gate_t = gate if gate is not None else delta
    lse_t = lse_t if gim else lse
    o_t = o_t if from_fwd else out
    d_pad, dv_pad = _pow2(dim), _pow2(dim_v)
    common = dict(
        D_PAD=d_pad, DV_PAD=dv_pad, IS_CAUSAL=causal, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, HAS_PAD=pad is not None, MASK_KIND=mask_kind,
        HAS_GATE=gate is not None, GIM=gim, PREC=_precision(q.dtype),
    )
    options = (softcap or 1.0, window or 1, temperature)
    dtype, extras = _dtype_name(q.dtype), _extras(pad, mask, gate, softcap)
    variant = config_variant("dq", dtype=dtype, stats=False, gim=gim, stats_from_fwd=from_fwd, extras=extras)
    kernel, meta = _kernel("dq", max(d_pad, dv_pad), q.device, variant)
    with device_guard(q):
        kernel[flat_grid(lq, batch * hq, "BLOCK_M")](
            q, k, v, dout, out, lse, o_t, lse_t, delta, dq, gate_t, pad_t, mask_t,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), stride_pb, *ms,
            hq, hq // hkv, lq, lk, dim, dim_v, scale, *options, scale * q_scale,
            _pow2(lq), _pow2(lk), STATS_FROM_FWD=from_fwd, **common, **meta,
        )
    variant = config_variant("dkdv", dtype=dtype, stats=False, gim=gim, stats_from_fwd=from_fwd, extras=extras)
    kernel, meta = _kernel("dkdv", max(d_pad, dv_pad), q.device, variant)
    with device_guard(q):
        kernel[flat_grid(lk, batch * hkv, "BLOCK_N")](
            q, k, v, dout, lse, lse_t, delta, dk, dv, dgate, gate_t, pad_t, mask_t,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), stride_pb, *ms,
            hq, hkv, hq // hkv, lq, lk, dim, dim_v, scale, *options, scale * k_scale, v_scale,
            _pow2(lq), _pow2(lk), **common, **meta,
        )
    return dq, dk, dv, (dgate.to(gate.dtype) if gate is not None else None)
