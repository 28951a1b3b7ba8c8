"""The manifest of a dataset run: what ``attribute_dataset``'s records are the results of.

``<output>.manifest.json`` holds a hash of the texts, the explain settings, the method, the batch
size, the model (class, name, a hash of its config, a fingerprint of its weights), the tokenizer and
the fastgim version. A run resumes from the part files only when the manifest matches; records of a
different run are never returned as if they were this one's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

_SAMPLE = 1024  # values per parameter in the weights fingerprint (plus each parameter's float64 sum)


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def method_name(explain_fn: Callable | None) -> str:
    """``"explain"`` for the built-in worker, else the worker's qualified name."""
    if explain_fn is None:
        return "explain"
    return f"{getattr(explain_fn, '__module__', '?')}.{getattr(explain_fn, '__qualname__', repr(explain_fn))}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1).cpu().contiguous()
    return _sha256(flat.view(torch.uint8).numpy().tobytes() + str((tuple(tensor.shape), tensor.dtype)).encode())


def jsonable(value: Any) -> Any:
    """A JSON-compatible, comparable description of ``value`` (tensors by hash, callables by name)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.Tensor):
        return {"tensor_sha256": _tensor_digest(value)}
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of every parameter's name, shape, dtype, float64 sum and an evenly strided sample of its values.

    Parameters offloaded to the meta device (accelerate) contribute their name, shape and dtype only.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            digest.update(f"{name}|{tuple(parameter.shape)}|{parameter.dtype}|".encode())
            if parameter.device.type == "meta":  # offloaded by accelerate: no values here
                continue
            flat = parameter.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].float().cpu()
            total = float(torch.sum(flat, dtype=torch.float64)) if flat.is_floating_point() else float(flat.sum())
            digest.update(f"{total!r}|".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _config_digest(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    stable = {k: v for k, v in to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return _sha256(json.dumps(jsonable(stable), sort_keys=True).encode())


def describe_run(model: nn.Module, tokenizer: Any, texts: Sequence[str], method: str, batch_size: int,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a run (JSON-compatible)."""
    import fastgim

    config = getattr(model, "config", None)
    return jsonable({
        "fastgim_version": fastgim.__version__,
        "method": method,
        "batch_size": batch_size,
        "settings": settings,
        "texts": {"count": len(texts), "sha256": _sha256(json.dumps(list(texts)).encode())},
        "model": {
            "class": type(model).__name__,
            "name": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None),
            "config_sha256": _config_digest(model),
            "weights": weights_fingerprint(model) if isinstance(model, nn.Module) else None,
        },
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "name": getattr(tokenizer, "name_or_path", None),
            "size": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        },
    })


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return sorted(key for key in set(found) | set(expected) if found.get(key) != expected.get(key))


def _start_over(output: Path) -> str:
    return (f"To start over, delete {output}, {output.name}.part-*.jsonl and {manifest_path(output).name} in "
            f"{output.parent}, or write to another output path")


def _write(path: Path, manifest: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)


def _read(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"the manifest {path} is damaged ({error}). {_start_over(path)}") from error


def claim(output: Path, expected: dict[str, Any], records: dict[int, Any]) -> None:
    """Rank 0, before any compute: write the manifest, or check that the existing results are of this run.

    A manifest that differs is replaced only while no record exists yet; part files without a manifest
    (unknown provenance) are refused.
    """
    path = manifest_path(output)
    found = _read(path)
    if found == expected:
        return
    if records and found is None:
        raise ValueError(
            f"{output} has {len(records)} earlier records but no manifest saying what they are the results of; "
            f"they cannot be resumed safely. {_start_over(output)}"
        )
    if records:
        raise ValueError(
            f"{output} holds {len(records)} records of a different run (it differs in: "
            f"{', '.join(_differences(found, expected))}). {_start_over(output)}"
        )
    _write(path, expected)


def check(output: Path, expected: dict[str, Any]) -> None:
    """Every rank: the manifest on disk is this run's (after rank 0 claimed it)."""
    found = _read(manifest_path(output))
    if found != expected:
        differs = "missing" if found is None else ", ".join(_differences(found, expected))
        raise ValueError(f"the manifest of {output} does not match this rank's run ({differs}). {_start_over(output)}")
