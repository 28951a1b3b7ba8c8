"""Triton RMSNorm: forward saving ``rstd``, backward with GIM's frozen statistic or the ordinary one.

Rows of a contiguous ``(rows, hidden)`` matrix; each program takes ``BLOCK_M`` rows (several rows per
program for small hidden sizes such as q_norm / k_norm) and the whole row in registers. Statistics and
arithmetic in fp32; the casting order of the model family is reproduced exactly (``CAST``: 0 = llama,
``w * n.to(x.dtype)``; 1 = gemma, ``(n * (offset + w.float())).to(x.dtype)``; 2 = olmo2,
``(w * n).to(x.dtype)``). The backward's weight gradient is reduced per program into a fp32 partial
buffer ``(programs, hidden)`` and summed by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgim.kernels.launch import device_guard

CASTS = {"llama": 0, "gemma": 1, "olmo2": 2}
MAX_HIDDEN = 65536


def block_config(hidden: int, min_rows_elems: int = 2048) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for rows of ``hidden`` elements held in registers."""
    if hidden > MAX_HIDDEN:
        raise ValueError(
            f"the Triton norm kernels hold a row in registers and support hidden <= {MAX_HIDDEN}, got {hidden}; "
            f"use backend='torch' (or FASTGIM_NORM_BACKEND=torch)"
        )
    block_n = triton.next_power_of_2(hidden)
    block_m = max(1, min(16, min_rows_elems // block_n))
    elems = block_m * block_n
    num_warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return block_m, block_n, num_warps


def backward_programs(device: torch.device, row_blocks: int) -> int:
    """How many persistent programs the backward uses (each accumulates a weight-gradient partial)."""
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count * 4
    else:
        target = 4  # Triton interpreter: few programs keep it fast
    return max(1, min(row_blocks, target))


def check_rows(name: str, t: torch.Tensor, rows: int | None = None, hidden: int | None = None) -> None:
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous (rows, hidden) matrix, got shape {tuple(t.shape)}")
    if (rows is not None and t.shape[0] != rows) or (hidden is not None and t.shape[1] != hidden):
        raise ValueError(f"{name} must have shape {(rows, hidden)}, got {tuple(t.shape)}")


@triton.jit
def _weight_eff(W, cols, cmask, offset, CAST: tl.constexpr):
    """``w_eff`` as fp32 values, rounded as the model rounds it (weight dtype, or fp32 for gemma)."""
    w32 = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if CAST == 1:
        return w32 + offset
    return (w32 + offset).to(W.dtype.element_ty).to(tl.float32)


@triton.jit
def _rms_fwd_kernel(X, W, OUT, RSTD, n_rows, n_cols, eps, offset,
                    HAS_W: tl.constexpr, CAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    n = x * rstd[:, None]
    if HAS_W:
        w_eff = _weight_eff(W, cols, cmask, offset, CAST)[None, :]
        if CAST == 0:
            out = w_eff * n.to(X.dtype.element_ty).to(tl.float32)
        else:
            out = n * w_eff
    else:
        out = n
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, offset, rows_per_prog,
                    HAS_W: tl.constexpr, WANT_DW: tl.constexpr, CAST: tl.constexpr, FROZEN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    if HAS_W:
        w_eff = _weight_eff(W, cols, cmask, offset, CAST)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, rows_per_prog, BLOCK_M):
        rows = pid * rows_per_prog + start + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
        n = x * rstd
        if HAS_W:
            g = dy * w_eff
        else:
            g = dy
        if WANT_DW:
            if CAST == 0:
                acc += dy * n.to(X.dtype.element_ty).to(tl.float32)
            else:
                acc += dy * n
        if FROZEN:
            dx = g * rstd
        else:
            dx = (g - n * (tl.sum(g * n, axis=1) / n_cols)[:, None]) * rstd
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if WANT_DW:
        tl.store(DW_PART + pid * n_cols + cols, tl.sum(acc, axis=0), mask=cmask)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor | None, cast: str) -> torch.dtype:
    if cast == "llama" and weight is not None:
        return torch.promote_types(weight.dtype, x.dtype)
    return x.dtype


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float, cast: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm forward of ``x`` ``(rows, hidden)``, contiguous; returns ``(out, rstd)``.

    ``out`` is ``(rows, hidden)`` in the module's output dtype; ``rstd`` ``(rows,)`` fp32.
    """
    check_rows("x", x)
    if cast not in CASTS:
        raise ValueError(f"unknown cast {cast!r}; choose one of {', '.join(CASTS)}")
    rows, hidden = x.shape
    block_m, block_n, warps = block_config(hidden)
    out = torch.empty((rows, hidden), dtype=_out_dtype(x, weight, cast), device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, rstd
    with device_guard(x):
        _rms_fwd_kernel[(triton.cdiv(rows, block_m),)](
            x, x if weight is None else weight, out, rstd, rows, hidden, float(eps), float(weight_offset),
            HAS_W=weight is not None, CAST=CASTS[cast], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return out, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, weight_offset: float,
    cast: str, frozen: bool, want_dweight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm backward; ``dy`` and ``x`` contiguous ``(rows, hidden)``, ``rstd`` ``(rows,)`` fp32.

    Returns ``dx`` (x's dtype) and ``dweight`` (weight's dtype; None without a weight or when not
    ``want_dweight``). ``frozen``:
    ``dx = dy * w_eff * rstd``; else the ordinary gradient.
    """
    check_rows("x", x)
    rows, hidden = x.shape
    check_rows("dy", dy, rows, hidden)
    if cast not in CASTS:
        raise ValueError(f"unknown cast {cast!r}; choose one of {', '.join(CASTS)}")
    block_m, block_n, warps = block_config(hidden)
    dx = torch.empty_like(x)
    row_blocks = triton.cdiv(rows, block_m)
    programs = backward_programs(x.device, row_blocks)
    rows_per_prog = triton.cdiv(row_blocks, programs) * block_m
    programs = max(1, triton.cdiv(rows, rows_per_prog))
    has_w = weight is not None
    want_dw = has_w and want_dweight
    partial = torch.empty((programs, hidden) if want_dw else (0,), dtype=torch.float32, device=x.device)
    if rows > 0:
        with device_guard(x):
            _rms_bwd_kernel[(programs,)](
                dy, x, weight if has_w else x, rstd, dx, partial, rows, hidden, float(weight_offset), rows_per_prog,
                HAS_W=has_w, WANT_DW=want_dw, CAST=CASTS[cast], FROZEN=bool(frozen), BLOCK_M=block_m,
                BLOCK_N=block_n, num_warps=warps,
            )
    if not want_dw:
        return dx, None
    dw = partial.sum(0) if rows > 0 else torch.zeros(hidden, dtype=torch.float32, device=x.device)
    return dx, dw.to(weight.dtype)
