"""The optional CUDA extension ``fastgim._C`` (sources in ``csrc/``) and the norm backend over it.

Loading order: ``import fastgim._C`` (built by ``setup.py`` when CUDA torch and nvcc exist); else, on a
machine with CUDA torch, nvcc, ninja and the ``csrc/`` sources (a source checkout), a one-time JIT build
with :func:`torch.utils.cpp_extension.load` (cached by torch; ``FASTGIM_CUDA_JIT=0`` disables it). The
package never needs the extension: when it cannot be loaded, :func:`is_available` is False and the norms
run on Triton or torch.

The functions below have the signatures of :mod:`fastgim.kernels.rms_norm` / ``layer_norm`` so that
:mod:`fastgim.ops.norms` can use either backend.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parents[3] / "csrc"
ARCH_FLAGS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90")


def sources() -> list[Path]:
    """The extension's source files in a source checkout (empty when ``csrc/`` is not there)."""
    if not CSRC.is_dir():
        return []
    return sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.cu")])


def _jit_build():
    from torch.utils import cpp_extension

    logger.warning("building the fastgim CUDA extension with ninja (one time, cached); FASTGIM_CUDA_JIT=0 skips it")
    return cpp_extension.load(
        name="fastgim_C_jit",
        sources=[str(p) for p in sources()],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", *ARCH_FLAGS],
        with_cuda=True,
        verbose=False,
    )


def _jit_possible() -> bool:
    return (
        os.environ.get("FASTGIM_CUDA_JIT", "1") != "0"
        and torch.version.cuda is not None
        and bool(sources())
        and shutil.which("nvcc") is not None
        and shutil.which("ninja") is not None
    )


@functools.cache
def load():
    """The loaded extension module, or None when it is neither built nor buildable here."""
    try:
        return importlib.import_module("fastgim._C")
    except ImportError:
        pass
    if not _jit_possible():
        return None
    try:
        return _jit_build()
    except Exception as exc:  # a failed build must not break the package: fall back to Triton / torch
        logger.warning("fastgim CUDA extension JIT build failed (%s); using Triton / torch norms", exc)
        return None


def is_available(device: torch.device | None = None) -> bool:
    """True when the extension's ops can run (on ``device`` if given)."""
    if device is not None and device.type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    return load() is not None and hasattr(torch.ops.fastgim_C, "rms_norm_forward")


def supports_rms(x: torch.Tensor, weight: torch.Tensor | None, cast: str) -> bool:
    """Whether the CUDA RMSNorm handles this call: its output dtype must be x's (not Llama's promotion)."""
    return not (cast == "llama" and weight is not None and torch.promote_types(weight.dtype, x.dtype) != x.dtype)


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def _rms_weight_eff(weight: torch.Tensor | None, weight_offset: float, cast: str) -> torch.Tensor | None:
    """``w_eff`` as fp32, rounded as the family rounds it (fp32 for gemma, the weight's dtype otherwise)."""
    if weight is None:
        return None
    if cast == "gemma":
        return (weight_offset + weight.float()).contiguous()
    w = weight if weight_offset == 0.0 else weight + weight_offset
    return w.float().contiguous()


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, weight_offset: float, cast: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm forward on contiguous ``(rows, hidden)`` CUDA ``x``; ``(out, rstd)`` as the Triton kernel."""
    if not supports_rms(x, weight, cast):
        raise ValueError("the CUDA RMSNorm writes x's dtype; Llama's promotion to the weight dtype needs Triton")
    return torch.ops.fastgim_C.rms_norm_forward(
        x, _rms_weight_eff(weight, weight_offset, cast), float(eps), cast == "llama", _stream(x)
    )


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, weight_offset: float,
    cast: str, frozen: bool, want_dweight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm backward; ``(dx, dweight)`` as :func:`fastgim.kernels.rms_norm.rms_norm_backward`."""
    want = weight is not None and want_dweight
    dx, dw_part = torch.ops.fastgim_C.rms_norm_backward(
        dy, x, _rms_weight_eff(weight, weight_offset, cast), rstd, cast == "llama", bool(frozen), want, _stream(x)
    )
    return dx, (dw_part.sum(0).to(weight.dtype) if want else None)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, cast: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm forward on contiguous ``(rows, hidden)`` CUDA ``x``; ``(out, mean, rstd)``."""
    return torch.ops.fastgim_C.layer_norm_forward(x, _f32(weight), _f32(bias), float(eps), _stream(x))


def layer_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, frozen: bool, want_dweight: bool = True, want_dbias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm backward; ``(dx, dweight, dbias)`` (None for absent or unwanted parameters)."""
    want_dw, want_db = weight is not None and want_dweight, bias is not None and want_dbias
    dx, dw_part, db_part = torch.ops.fastgim_C.layer_norm_backward(
        dy, x, _f32(weight), mean, rstd, bool(frozen), want_dw, want_db, _stream(x)
    )
    dw = dw_part.sum(0).to(weight.dtype) if want_dw else None
    db = db_part.sum(0).to(bias.dtype) if want_db else None
    return dx, dw, db
