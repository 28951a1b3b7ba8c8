"""Named tensors on one device, and datasets of them (inteprelens' ``TensorDict`` / ``TensorDictDataset``).

A :class:`TensorDict` maps names to tensors (or nested TensorDicts) that all live on one device. It
reads like a dict and like an object (``td["x"]`` and ``td.x``), indexes every field at once
(``td[2:5]``), and forwards the usual tensor methods to every field (``td.float()``, ``td.to("cuda")``,
``td.sum(0)``). :class:`TensorDictDataset` is a TensorDict whose fields share their first dimension,
usable as a ``torch.utils.data`` dataset: ``len`` counts samples, ``dataset[i]`` is one sample.

The API (names, signatures, defaults, results) is inteprelens 0.2.1's ``inteprelens.utils.tensor_dict``
and ``inteprelens.utils.ds``; deliberate differences, each where inteprelens fails or misreads:

* ``cat`` / ``stack`` of an empty list or of TensorDicts with different keys raise a ``ValueError``
  naming the problem (inteprelens: ``IndexError`` / ``KeyError``); a negative ``dim`` of ``cat`` is
  not padded (inteprelens pads it too, so it concatenates padded pieces);
* ``load`` reads with ``torch.load(weights_only=True)`` (a saved TensorDict holds only tensors and
  dicts, so every file ``save`` writes loads, and a file cannot run code);
* a value that cannot become a tensor (a string, ``None``) raises a ``TypeError`` naming the field;
* ``len`` of an empty TensorDictDataset is 0 (inteprelens raises ``StopIteration``), and its
  data loaders check that every field has the same number of samples.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fastgim.utils import format_memory_size

__all__ = ["TensorDict", "TensorDictDataset"]

T = TypeVar("T", bound="TensorDict")

def _pad_to_common_shape(tensors: Sequence[torch.Tensor], pad_value: float, keep_dims: Sequence[int] = ()
                         ) -> list[torch.Tensor]:
    """Pad each tensor at the end of every dimension (except ``keep_dims``) to the largest size among them."""
    ndim = tensors[0].dim()
    if any(t.dim() != ndim for t in tensors):
        raise ValueError(f"cannot pad tensors of different ranks {[t.dim() for t in tensors]} to one shape")
    keep = {d % ndim for d in keep_dims} if ndim else set()
    target = [max(t.shape[d] for t in tensors) for d in range(ndim)]
    padded = []
    for t in tensors:
        missing = [0 if d in keep else target[d] - t.shape[d] for d in range(ndim)]
        if any(missing):
            widths = [w for d in reversed(range(ndim)) for w in (0, missing[d])]
            t = F.pad(t, widths, value=pad_value)
        padded.append(t)
    return padded


def _combine(tds: Sequence[TensorDict], join: Callable[[list[torch.Tensor]], torch.Tensor], what: str
             ) -> TensorDict:
    """Field by field ``join`` of the tensors of ``tds`` (recursing into nested TensorDicts)."""
    if len(tds) == 0:
        raise ValueError(f"TensorDict.{what} needs at least one TensorDict, got an empty list")
    keys = list(tds[0].keys())
    for i, td in enumerate(tds[1:], start=1):
        if set(td.keys()) != set(keys):
            raise ValueError(f"TensorDict.{what}: item {i} has keys {list(td.keys())}, item 0 has {keys}; "
                             "give TensorDicts with the same keys")
    out = {}
    for key in keys:
        values = [td[key] for td in tds]
        out[key] = _combine(values, join, what) if isinstance(values[0], TensorDict) else join(values)
    return TensorDict(**out)


class TensorDict(Mapping):
    """Named tensors (or nested TensorDicts) on one device, with batch-wise operations.

    Example::

        td = TensorDict(obs=torch.randn(32, 4), act=torch.randint(0, 3, (32,)))
        td.obs.shape               # torch.Size([32, 4]); td["obs"] is the same tensor
        td[:8]                     # a TensorDict with the first 8 rows of every field
        td.map(lambda x: x * 2)    # a new TensorDict; td.float(), td.to(device), td.sum(0) likewise

    Raises ``ValueError`` when tensors on different devices are combined.
    """

    def __init__(self, **kwargs: Any):
        self._dict: OrderedDict[str, Any] = OrderedDict()
        devices = {v.device for v in kwargs.values() if isinstance(v, torch.Tensor)}
        if len(devices) > 1:
            raise ValueError(f"All tensors must be on the same device. Devices found: {devices}")
        for key, value in kwargs.items():
            self[key] = value

    @property
    def device(self) -> torch.device | None:
        """The device of the first tensor (searching nested TensorDicts); None when there is none."""
        for value in self._dict.values():
            if isinstance(value, torch.Tensor):
                return value.device
            if isinstance(value, TensorDict):
                return value.device
        return None

    @staticmethod
    def cat(tds: list[TensorDict], dim: int = 0, pad_value: float | None = None) -> TensorDict:
        """Concatenate ``tds`` field by field along ``dim``.

        With ``pad_value``, every other dimension is first padded at its end to the largest size
        among the pieces.
        """
        def join(tensors: list[torch.Tensor]) -> torch.Tensor:
            if pad_value is not None:
                tensors = _pad_to_common_shape(tensors, pad_value, keep_dims=[dim])
            return torch.cat(tensors, dim=dim)

        return _combine(tds, join, "cat")

    @staticmethod
    def stack(tds: list[TensorDict], dim: int = 0, pad_value: float | None = None) -> TensorDict:
        """Stack ``tds`` field by field along a new dimension ``dim``.

        With ``pad_value``, every dimension is first padded at its end to the largest size among them.
        """
        def join(tensors: list[torch.Tensor]) -> torch.Tensor:
            if pad_value is not None:
                tensors = _pad_to_common_shape(tensors, pad_value)
            return torch.stack(tensors, dim=dim)

        return _combine(tds, join, "stack")

    # ------------------------------------------------------------------ mapping and attribute access

    def __getitem__(self, key: Any) -> Any:
        """A field by name, a TensorDict of the named fields (list of names), or every field indexed by ``key``."""
        if isinstance(key, str):
            return self._dict[key]
        if isinstance(key, (list, tuple)) and key and isinstance(key[0], str):
            return TensorDict(**{name: self._dict[name] for name in key})
        return TensorDict(**{name: value[key] for name, value in self._dict.items()})

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, Mapping) and not isinstance(value, TensorDict):
            value = TensorDict(**value)
        if isinstance(value, (torch.Tensor, TensorDict)):
            if self._dict:
                self._check_device(value)
            self._dict[key] = value
            return
        try:
            self._dict[key] = torch.tensor(value, device=self.device or "cpu")
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"field {key!r}: a {type(value).__name__} cannot become a tensor ({error}); give a "
                            "tensor, a number, a nested list of numbers or a mapping of those") from error

    def __getattr__(self, item: str) -> Any:
        fields = self.__dict__.get("_dict")
        if not item.startswith("_") and fields is not None and item in fields:
            return fields[item]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{item}'")

    def __setattr__(self, key: str, value: Any) -> None:
        fields = self.__dict__.get("_dict")
        if fields is None or key not in fields:
            super().__setattr__(key, value)
            return
        if not isinstance(value, (torch.Tensor, TensorDict)):
            raise TypeError(f"Cannot assign non-tensor to registered tensor field '{key}'")
        self._check_device(value)
        fields[key] = value

    def __delitem__(self, key: str) -> None:
        del self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def __contains__(self, key: object) -> bool:
        return key in self._dict

    def __repr__(self) -> str:
        def describe(name: str, value: Any) -> str:
            if isinstance(value, torch.Tensor):
                shape = f"({value.shape[0]})" if value.dim() == 1 else str(tuple(value.shape))
                return f"{name}[{str(value.dtype).removeprefix('torch.')}]: {shape}"
            return f"{name}: {type(value).__name__}"

        fields = ", ".join(describe(name, value) for name, value in self._dict.items())
        return f"{type(self).__name__}[{self.memory_bytes_str()}] ({fields})"

    def _check_device(self, item: Any) -> None:
        device = self.device
        if hasattr(item, "device") and device is not None and item.device != device:
            raise ValueError(f"Tried to set Tensor on device {item.device} to TensorDict on device {device}.")

    # ------------------------------------------------------------------ whole-dict operations

    def update(self, other: Mapping[str, Any]) -> None:
        """Set every ``key, value`` of ``other`` (mappings become nested TensorDicts)."""
        if not isinstance(other, Mapping):
            raise TypeError("update() expects a Mapping or TensorDict")
        for key, value in other.items():
            self[key] = value

    def map(self: T, f: Callable[[torch.Tensor], torch.Tensor]) -> T:
        """A new TensorDict of the same class with ``f`` applied to every tensor (nested ones included)."""
        return self.__class__(**self._mapped(f))

    def _mapped(self, f: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        out = {}
        for key, value in self._dict.items():
            if isinstance(value, TensorDict):
                out[key] = value.map(f)
            elif isinstance(value, torch.Tensor):
                out[key] = f(value)
            else:
                raise TypeError(f"Cannot apply map to non-tensor field '{key}' of type {type(value)}")
        return out

    def save(self, path: str) -> None:
        """Write :meth:`to_dict` with ``torch.save``."""
        torch.save(self.to_dict(), path)

    @classmethod
    def load(cls: type[T], path: str, map_location: str | None = None) -> T:
        """Read a file written by :meth:`save` (tensors and dicts only: ``torch.load(weights_only=True)``)."""
        return cls(**torch.load(path, map_location=map_location, weights_only=True))

    def to_dict(self) -> dict:
        """The fields as a plain ``dict`` (nested TensorDicts as nested dicts)."""
        return {key: value.to_dict() if isinstance(value, TensorDict) else value for key, value in self._dict.items()}

    def partition(self, parts: list[int] | list[float], seed: int = 0, drop_remainder: bool = True
                  ) -> list[TensorDict]:
        """Random disjoint splits of the rows (dim 0): ``parts`` are row counts (ints) or fractions (floats).

        Rows are shuffled by ``torch.randperm`` seeded with ``seed`` on the TensorDict's device; with
        ``drop_remainder=False`` the rows left over form one more split.
        """
        lengths = {key: value.shape[0] for key, value in self._dict.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All entries must have the same length along dim=0, got {lengths}")
        count = next(iter(lengths.values()))
        if all(isinstance(p, float) for p in parts):
            sizes = [int(count * p) for p in parts]
        elif all(isinstance(p, int) for p in parts):
            sizes = list(parts)
        else:
            raise ValueError(f"Parts must be all floats (fractions) or all ints (row counts), got {parts}")
        if sum(sizes) > count:
            raise ValueError(f"Requested partition sizes {sizes} exceed dataset length {count}")
        if any(size < 0 for size in sizes):
            raise ValueError(f"partition sizes must be >= 0, got {sizes}")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        order = torch.randperm(count, generator=generator, device=self.device)
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        if not drop_remainder and bounds[-1] < count:
            bounds.append(count)
        return [TensorDict(**{key: value[order[start:stop]] for key, value in self._dict.items()})
                for start, stop in zip(bounds[:-1], bounds[1:])]

    def memory_bytes(self) -> int:
        """Bytes held by the tensors (nested TensorDicts included)."""
        return sum(value.memory_bytes() if isinstance(value, TensorDict) else value.numel() * value.element_size()
                   for value in self._dict.values())

    def memory_bytes_str(self, precision: int = 2, unit: str | None = None) -> str:
        """:meth:`memory_bytes` as ``"12.50 KB"`` (``unit`` one of B, KB, MB, GB, TB; chosen when None)."""
        return format_memory_size(self.memory_bytes(), precision=precision, unit=unit)


_FORWARDED_TENSOR_METHODS = (
    "detach", "cpu", "cuda", "float", "double", "half", "int", "long", "bfloat16", "short", "byte", "bool", "clone",
    "contiguous", "squeeze", "unsqueeze", "mean", "sum", "softmax", "log_softmax", "transpose", "permute", "abs",
    "sqrt", "tanh", "relu", "to",
)


def _forwarded(name: str) -> Callable[..., TensorDict]:
    def method(self: TensorDict, *args: Any, **kwargs: Any) -> TensorDict:
        return self.map(lambda tensor: getattr(tensor, name)(*args, **kwargs))

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"``torch.Tensor.{name}`` applied to every tensor: a new TensorDict (see :meth:`map`)."
    return method


for _name in _FORWARDED_TENSOR_METHODS:
    setattr(TensorDict, _name, _forwarded(_name))


class TensorDictDataset(TensorDict):
    """A TensorDict of per-sample fields (first dimension = sample) usable as a PyTorch dataset.

    ``len(dataset)`` is the number of samples and ``dataset[i]`` one sample as a TensorDict (a field
    name still gives the field). Example::

        dataset = TensorDictDataset(input_ids=torch.randint(0, 1000, (100, 64)), labels=torch.randint(0, 10, (100,)))
        for batch in dataset.to_dataloader(batch_size=8):
            batch["input_ids"].shape   # (8, 64)
    """

    def __len__(self) -> int:
        first = next(iter(self._dict.values()), None)
        return 0 if first is None else len(first)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str) or (isinstance(index, (list, tuple)) and index and isinstance(index[0], str)):
            return super().__getitem__(index)
        return TensorDict(**{key: value[index] for key, value in self._dict.items()})

    def collate_fn(self, batch: list[TensorDict]) -> TensorDict:
        """Stack samples into a batch (:meth:`TensorDict.stack`)."""
        return TensorDict.stack(batch)

    def to_dataloader(self, infinite: bool = False, **kwargs: Any) -> DataLoader | Iterator[TensorDict]:
        """A ``DataLoader`` over this dataset with :meth:`collate_fn` (``kwargs``: batch_size, shuffle, ...).

        With ``infinite=True``, an endless iterator that starts a fresh pass (a new shuffle) after each one.
        """
        self._check_sample_counts()
        if not infinite:
            return DataLoader(self, collate_fn=self.collate_fn, **kwargs)

        def endless() -> Iterator[TensorDict]:
            while True:
                yield from DataLoader(self, collate_fn=self.collate_fn, **kwargs)

        return endless()

    def to_iterator(self, **kwargs: Any) -> Iterator[TensorDict]:
        """``iter(self.to_dataloader(infinite=True, **kwargs))``: endless batches."""
        return iter(self.to_dataloader(infinite=True, **kwargs))

    def _check_sample_counts(self) -> None:
        counts = {key: len(value) for key, value in self._dict.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"{type(self).__name__}: fields hold different numbers of samples {counts}; every "
                             "field needs the same first dimension")
