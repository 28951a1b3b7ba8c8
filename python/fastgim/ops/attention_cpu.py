"""Optional C++ kernel for the GIM attention backward on CPU (``csrc/cpu/gim_attention.cpp``).

The ``torch`` backend calls :func:`backward` instead of its blockwise PyTorch backward when
:func:`serves` says the kernel handles the problem: CPU tensors (float32 / float64; bfloat16 with
bfloat16 GEMMs accumulating in float32 and float32 softmax arithmetic; float16 computed in float32),
no attention mask, no sliding window, no softcap, and causal only
with ``Lq <= Lk``. Everything else (and any machine where the kernel cannot be loaded) stays on the
PyTorch path, which computes the same values.

Loading, tried once per process and never required:

1. a library built at install time by ``setup.py`` (``fastgim/_cpu_kernels*.so``, when a C++
   compiler was present);
2. else a JIT build of the source with ``torch.utils.cpp_extension.load`` (needs a C++ compiler and
   ninja; cached by torch under ``~/.cache/torch_extensions``);
3. else none: :func:`kernel_status` says why.

``FASTGIM_CPU_KERNEL=0`` turns the kernel off.
"""

from __future__ import annotations

import glob
import os
import threading
from pathlib import Path

import torch

#: Module flag read at every call (the environment variable sets its initial value).
ENABLED = os.environ.get("FASTGIM_CPU_KERNEL", "1") != "0"
#: Compiler flags of the kernel (``setup.py`` uses the same): the hot loops vectorise only without
#: floating-point trap semantics; ``-fopenmp-simd`` honours their ``omp simd`` reductions.
CXX_FLAGS = ("-O3", "-fopenmp-simd", "-fno-trapping-math")
#: Most query rows of one block (per head, the block's score tiles are ``rows * Lk``).
MAX_BLOCK_ROWS = 64

_PACKAGE = Path(__file__).resolve().parents[1]
_SOURCE = _PACKAGE.parents[1] / "csrc" / "cpu" / "gim_attention.cpp"
_LOCK = threading.Lock()
_STATUS: list[str] = []  # [status] once a load was tried


def _load() -> str:
    prebuilt = sorted(glob.glob(str(_PACKAGE / "_cpu_kernels*.so")))
    # In a source checkout, a prebuilt library older than the source is stale: JIT-build instead.
    stale = _SOURCE.exists() and prebuilt and os.path.getmtime(prebuilt[0]) < os.path.getmtime(_SOURCE)
    if prebuilt and not stale:
        try:
            torch.ops.load_library(prebuilt[0])
            return "cpu-kernel (prebuilt)"
        except OSError:  # built against another torch: fall through to the JIT build
            if not _SOURCE.exists():
                raise
    if not _SOURCE.exists():
        return "torch (no prebuilt CPU kernel and no source to build)"
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="fastgim_cpu_kernels", sources=[str(_SOURCE)], extra_cflags=list(CXX_FLAGS),
        is_python_module=False, verbose=False,
    )
    return "cpu-kernel (jit)"


def kernel_status() -> str:
    """``"cpu-kernel (prebuilt)"``, ``"cpu-kernel (jit)"`` or ``"torch (<why not>)"``; loads on first call."""
    if not ENABLED:
        return "torch (FASTGIM_CPU_KERNEL=0)"
    with _LOCK:
        if not _STATUS:
            try:
                _STATUS.append(_load())
            except Exception as error:  # no compiler, no ninja, a failed build: the torch path serves
                _STATUS.append(f"torch (CPU kernel unavailable: {type(error).__name__}: {str(error)[:200]})")
        return _STATUS[0]


def available() -> bool:
    """Whether the kernel is loaded (building it on first call if needed)."""
    return kernel_status().startswith("cpu-kernel")


def serves(
    q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool,
    sliding_window: int | None, softcap: float | None, temperature: float,
) -> bool:
    """Whether :func:`backward` handles this problem (and the kernel is available)."""
    lq, lk = q.shape[2], k.shape[2]
    return (
        q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and attention_mask is None and sliding_window is None and softcap is None and temperature > 0
        and lq > 0 and lk > 0 and not (causal and lq > lk) and available()
    )


def backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
    gate: torch.Tensor | None, *, causal: bool, scale: float, temperature: float, q_scale: float,
    k_scale: float, v_scale: float, block_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GIM backward by the C++ kernel; contract of :func:`fastgim.ops.attention_torch.backward`.

    ``lse`` must be the forward's (finite: every row sees a key); ``block_rows`` query rows per block.
    """
    # bfloat16 runs on bfloat16 x bfloat16 -> float32 GEMMs; float16 is computed in float32.
    compute = q.dtype if q.dtype in (torch.float64, torch.bfloat16) else torch.float32
    dq, dk, dv, dgate = torch.ops.fastgim_cpu.gim_attention_backward(
        *(t.to(compute).contiguous() for t in (dout, q, k, v)), lse, gate, bool(causal), float(scale),
        float(temperature), float(q_scale), float(k_scale), float(v_scale), int(min(block_rows, MAX_BLOCK_ROWS)),
    )
    return (
        dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if gate is None else dgate.to(gate.dtype),
    )
