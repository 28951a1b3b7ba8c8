"""Triton LayerNorm (weight / bias optional): forward saving ``mean`` and ``rstd``, frozen or ordinary backward.

Same structure as :mod:`fastgim.kernels.rms_norm`. The forward computes in fp32 and rounds once:
``((x - mean) * rstd) * w + b``, which is what ``nn.LayerNorm`` (fp32 accumulation for half inputs),
OLMo's fp32 LayerNorm and Cohere's LayerNorm compute, up to fp32 rounding. Frozen backward (GIM):
``dx = (g - mean(g)) * rstd`` with ``g = dy * w``; ordinary: ``dx = rstd * (g - mean(g) - x_hat *
mean(g * x_hat))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgim.kernels.launch import device_guard
from fastgim.kernels.rms_norm import backward_programs, block_config, check_rows

CASTS = ("torch", "fp32", "cohere")


@triton.jit
def _ln_fwd_kernel(X, W, B, OUT, MEAN, RSTD, n_rows, n_cols, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    out = xc * rstd[:, None]
    if HAS_W:
        out = out * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        out = out + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, n_rows, n_cols, rows_per_prog,
                   HAS_W: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, FROZEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, rows_per_prog, BLOCK_M):
        rows = pid * rows_per_prog + start + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)[:, None]
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if HAS_W:
            g = dy * w
        else:
            g = dy
        if WANT_DW:
            acc_w += dy * xhat
        if WANT_DB:
            acc_b += dy
        g_centred = g - (tl.sum(g, axis=1) / n_cols)[:, None]
        if FROZEN:
            dx = g_centred * rstd
        else:
            dx = (g_centred - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None]) * rstd
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if WANT_DW:
        tl.store(DW_PART + pid * n_cols + cols, tl.sum(acc_w, axis=0), mask=cmask)
    if WANT_DB:
        tl.store(DB_PART + pid * n_cols + cols, tl.sum(acc_b, axis=0), mask=cmask)


def layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, cast: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm forward of contiguous ``x`` ``(rows, hidden)``; returns ``(out, mean, rstd)``.

    ``out`` in x's dtype, ``mean`` / ``rstd`` ``(rows,)`` fp32. ``cast`` only names the family (all are
    computed in fp32 and rounded once).
    """
    check_rows("x", x)
    if cast not in CASTS:
        raise ValueError(f"unknown layer_norm cast {cast!r}; choose one of {', '.join(CASTS)}")
    rows, hidden = x.shape
    block_m, block_n, warps = block_config(hidden)
    out = torch.empty_like(x)
    mean = torch.empty((rows,), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows > 0:
        with device_guard(x):
            _ln_fwd_kernel[(triton.cdiv(rows, block_m),)](
                x, x if weight is None else weight, x if bias is None else bias, out, mean, rstd, rows, hidden,
                float(eps), HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps,
            )
    return out, mean, rstd


def layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, frozen: bool, want_dweight: bool = True, want_dbias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm backward; ``dy``, ``x`` contiguous ``(rows, hidden)``; ``mean``, ``rstd`` ``(rows,)`` fp32.

    Returns ``(dx, dweight, dbias)`` in the dtypes of x / weight / bias (None for absent or unwanted ones).
    """
    check_rows("x", x)
    rows, hidden = x.shape
    check_rows("dy", dy, rows, hidden)
    block_m, block_n, warps = block_config(hidden)
    dx = torch.empty_like(x)
    row_blocks = triton.cdiv(rows, block_m)
    programs = backward_programs(x.device, row_blocks)
    rows_per_prog = triton.cdiv(row_blocks, programs) * block_m
    programs = max(1, triton.cdiv(rows, rows_per_prog))
    has_w = weight is not None
    has_w_grad, has_b = has_w and want_dweight, bias is not None and want_dbias
    dw_part = torch.zeros((programs, hidden) if has_w_grad else (0,), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((programs, hidden) if has_b else (0,), dtype=torch.float32, device=x.device)
    if rows > 0:
        with device_guard(x):
            _ln_bwd_kernel[(programs,)](
                dy, x, weight if has_w else x, mean, rstd, dx, dw_part, db_part, rows, hidden, rows_per_prog,
                HAS_W=has_w, WANT_DW=has_w_grad, WANT_DB=has_b, FROZEN=bool(frozen), BLOCK_M=block_m,
                BLOCK_N=block_n, num_warps=warps,
            )
    dw = dw_part.sum(0).to(weight.dtype) if has_w_grad else None
    db = db_part.sum(0).to(bias.dtype) if has_b else None
    return dx, dw, db
