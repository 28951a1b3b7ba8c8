"""When the automatically chosen ``triton`` backend cannot compile or launch, run another one.

:func:`fastgim.attention` on CUDA picks the Triton kernels unless a backend is named (argument or
``$FASTGIM_BACKEND``). If they fail for a problem (``OutOfResources``, an unsupported architecture,
an old Triton, a failed import ...), the call warns once for that device, dtype and head size,
naming the cause, and runs the ``sdpa`` backend (or ``torch`` where ``sdpa`` cannot serve the call,
e.g. softcap) with the same semantics; later calls of that kind go there directly. A backend named
by the user never falls back: its errors are raised.

The op carries the choice as a chain ``"triton>sdpa"``: each part is tried in turn, so a failure in
the backward (the larger kernels) also falls back, using the forward's saved outputs (same
semantics in every backend).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

SEPARATOR = ">"
_Result = TypeVar("_Result")
_FAILURES: dict[tuple, str] = {}  # problem key -> cause, for calls whose Triton kernels failed


def primary(chain: str) -> str:
    """The first backend of a chain (the name itself for a plain backend name)."""
    return chain.split(SEPARATOR, 1)[0]


def _key(q: torch.Tensor, v: torch.Tensor) -> tuple:
    return str(q.device), q.dtype, q.shape[-1], v.shape[-1]


def _cause(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _fallback_target(q: torch.Tensor, softcap: float | None) -> str:
    from fastgim.ops import attention_sdpa

    return "sdpa" if attention_sdpa.unsupported(q, softcap) is None else "torch"


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure to import is the cause to report
        return _cause(error)
    return None


def _warn(q: torch.Tensor, v: torch.Tensor, cause: str, target: str) -> None:
    key = _key(q, v)
    if key in _FAILURES:
        return
    _FAILURES[key] = cause
    warnings.warn(
        f"fastgim: the triton attention kernels cannot run on {q.device} ({q.dtype}, head_dim {q.shape[-1]}): "
        f"{cause}. Running the {target!r} backend instead (same results, slower). Set FASTGIM_BACKEND=triton "
        f"to raise instead.",
        RuntimeWarning,
        stacklevel=4,
    )


def automatic(name: str, q: torch.Tensor, v: torch.Tensor, softcap: float | None) -> str:
    """The backend (chain) to run for ``name``, the backend :func:`resolve_backend` chose by itself."""
    triton_missing = q.device.type == "cuda" and name == "torch"  # resolve_backend found no usable Triton
    if name != "triton" and not triton_missing:
        return name
    target = _fallback_target(q, softcap)
    if _key(q, v) in _FAILURES:
        return target
    if name == "triton":
        return f"triton{SEPARATOR}{target}"
    _warn(q, v, _triton_import_error() or "Triton is not available", target)
    return target


def is_backend_failure(error: BaseException) -> bool:
    """Errors a fallback may answer: anything but running out of memory (another backend would too)."""
    return isinstance(error, Exception) and not isinstance(error, torch.OutOfMemoryError)


def run(chain: str, q: torch.Tensor, v: torch.Tensor, call: Callable[[str], _Result]) -> _Result:
    """``call(name)`` for the first backend of ``chain`` that works; a failure moves on, once warned."""
    names = chain.split(SEPARATOR)
    for index, name in enumerate(names):
        last = index == len(names) - 1
        if not last and _key(q, v) in _FAILURES:
            continue
        try:
            return call(name)
        except Exception as error:
            if last or not is_backend_failure(error):
                raise
            _warn(q, v, _cause(error), names[index + 1])
    raise AssertionError("unreachable: the last backend returns or raises")
