"""General helpers (inteprelens' ``utils.helpers``): byte formatting, seeding, devices, losses, long tables.

Each function has inteprelens 0.2.1's signature, defaults and results (``fastgim.inteprelens.utils.helpers``
re-exports them). Where inteprelens fails on an input with an unclear error, or silently misreads one
(``to_long_df`` columns whose shape does not match the array's leading dimensions), these raise a
``ValueError`` naming the problem instead. Beyond inteprelens: ``cross_entropy`` also takes 1-D logits
and class-probability targets (on the last axis), ``to_long_df`` bfloat16 tensors and lists.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["format_memory_size", "seed_all", "cross_entropy", "get_device", "check_device", "logmeanexp",
           "to_long_df"]

MEMORY_UNITS = ("B", "KB", "MB", "GB", "TB")
_GIB = 1024**3


def format_memory_size(num_bytes: int, precision: int = 2,
                       unit: Literal["B", "KB", "MB", "GB", "TB"] | None = None) -> str:
    """``num_bytes`` as ``"<value> <unit>"`` with ``precision`` decimals, in powers of 1024.

    ``unit=None`` picks the unit from the number of bits of ``int(num_bytes)`` (``bit_length // 10``,
    so 1023 bytes print as ``"1.00 KB"``, as in inteprelens); a given unit is case-insensitive.
    """
    if unit is None:
        scale = min(len(MEMORY_UNITS) - 1, int(num_bytes).bit_length() // 10)
    else:
        if not isinstance(unit, str) or unit.upper() not in MEMORY_UNITS:
            raise ValueError(f"Invalid unit '{unit}', must be one of {list(MEMORY_UNITS)}")
        scale = MEMORY_UNITS.index(unit.upper())
    return f"{num_bytes / 1024**scale:.{precision}f} {MEMORY_UNITS[scale]}"


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (all CUDA devices too).

    Also sets ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False`` for the rest of
    the process, as inteprelens does.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def cross_entropy(input: torch.Tensor, target: torch.Tensor,
                  reduction: Literal["none", "mean", "sum"] = "mean") -> torch.Tensor:
    """``F.cross_entropy`` with the classes on the LAST axis: ``input (..., C)``, ``target (...)`` class ids.

    Class-probability targets of ``input``'s shape (floating) work too. ``ignore_index=-100`` as in
    PyTorch. ``reduction="none"`` returns ``target``'s shape; ``"mean"`` / ``"sum"`` a scalar.
    """
    if input.dim() == 0:
        raise ValueError("cross_entropy needs logits with a class axis (..., C), got a 0-d tensor")
    probabilities = target.is_floating_point() and target.shape == input.shape
    if not probabilities and target.shape != input.shape[:-1]:
        raise ValueError(f"cross_entropy: target shape {tuple(target.shape)} must be input's shape without its "
                         f"last (class) axis, {tuple(input.shape[:-1])} (or input's shape for probabilities)")
    if input.dim() > 1:
        input = input.movedim(-1, 1)
        target = target.movedim(-1, 1) if probabilities else target
    return F.cross_entropy(input, target, reduction=reduction)


def get_device(device: str | None = None) -> torch.device:
    """``torch.device(device)``; ``None`` picks ``cuda`` if available, else ``mps``, else ``cpu``."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def check_device() -> None:
    """Print the available accelerators: each CUDA GPU's name and memory (GB), or MPS, or CPU only.

    "Free Memory" is, as in inteprelens, the memory PyTorch's caching allocator holds but does not use
    (reserved minus allocated), not the GPU's free memory.
    """
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        print("CUDA is available!")
        print(f"Number of GPUs: {count}")
        for index in range(count):
            _print_cuda_memory(index)
    elif torch.backends.mps.is_available():
        print("MPS (Apple Silicon) is available!")
    else:
        print("No GPU available. Using CPU.")


def _print_cuda_memory(index: int) -> None:
    reserved, allocated = torch.cuda.memory_reserved(index), torch.cuda.memory_allocated(index)
    print(f"\nGPU {index}: {torch.cuda.get_device_name(index)}")
    sizes = {"Total": torch.cuda.get_device_properties(index).total_memory, "Reserved": reserved,
             "Allocated": allocated, "Free": reserved - allocated}
    for label, size in sizes.items():
        print(f"  {label} Memory: {size / _GIB:.2f} GB")


def logmeanexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(mean(exp(x), dim))`` computed stably as ``logsumexp(x, dim) - log(n)``; ``dim`` is removed."""
    count = torch.tensor(x.shape[dim], dtype=x.dtype, device=x.device)
    return torch.logsumexp(x, dim) - torch.log(count)


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    return np.asarray(values)


def _broadcast_column(name: str, values: Any, index_shape: tuple[int, ...], rows: int) -> np.ndarray:
    """``values`` over leading dimensions of ``index_shape`` (or one per row), repeated over the rest."""
    column = _as_array(values)
    if column.shape == index_shape[:column.ndim]:
        return np.repeat(column.reshape(-1), rows // max(column.size, 1))
    if column.ndim == 1 and column.size == rows:
        return column
    raise ValueError(f"to_long_df: column {name!r} has shape {column.shape}; it must span leading dimensions of "
                     f"{index_shape} (a prefix of it) or hold one value per row ({rows},)")


def to_long_df(array: torch.Tensor, dim_names: list, value_name: str = "value", **kwargs: Any):
    """A long-format ``pandas.DataFrame`` of ``array``: one row per index, one column per dimension.

    Columns: ``dim_names`` (int64 positions, row-major order), then ``value_name``. With a list of
    value names, ``array``'s last axis (of that length) is split into those columns instead. Each
    keyword is an extra column: an array whose shape is a prefix of the indexed dimensions (repeated
    over the others, e.g. one label per stage) or a 1-D array with one value per row.
    """
    import pandas as pd

    values = _as_array(array)
    names = [value_name] if isinstance(value_name, str) else list(value_name)
    index_shape = values.shape if isinstance(value_name, str) else values.shape[:-1]
    if values.ndim == 0 or len(dim_names) != len(index_shape):
        raise ValueError(f"to_long_df: {len(dim_names)} dim_names for the indexed dimensions {index_shape} "
                         f"of an array of shape {values.shape}; give one name per dimension")
    if not isinstance(value_name, str) and values.shape[-1] != len(names):
        raise ValueError(f"to_long_df: {len(names)} value names but the last axis has {values.shape[-1]} entries")
    if len(set(dim_names) | set(names) | set(kwargs)) != len(dim_names) + len(names) + len(kwargs):
        raise ValueError(f"to_long_df: column names repeat: {list(dim_names)}, {names}, {list(kwargs)}")
    rows = int(np.prod(index_shape))
    positions = np.indices(index_shape, dtype=np.int64).reshape(len(index_shape), rows)
    columns: dict[str, Any] = dict(zip(dim_names, positions))
    columns.update(zip(names, values.reshape(rows, len(names)).T))
    for name, extra in kwargs.items():
        columns[name] = _broadcast_column(name, extra, tuple(index_shape), rows)
    return pd.DataFrame(columns)

