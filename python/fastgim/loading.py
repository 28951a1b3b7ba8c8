"""Loading a model and its tokenizer: one place for the CLI, :class:`fastgim.LensAPI` and the default model.

:func:`load_model` turns every way loading can go wrong into a :class:`ModelLoadError` (a ``ValueError``)
whose message names the problem and the fix, instead of a hub traceback:

* a folder that does not exist, or one that is not a model folder (no ``config.json``);
* a name that is neither a local folder nor in the local Hugging Face cache;
* a checkpoint without the weights the causal-LM class needs (an encoder such as all-MiniLM-L6-v2
  loaded as a causal LM would get a newly initialised, random LM head and "explain" random predictions).

It also keeps transformers' "Loading weights" progress bar and its load report out of the output: the
report's content is checked here instead (missing weights are an error, unexpected ones a warning).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ModelLoadError", "load_model", "check_input_length"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json", "*.bin.index.json")
_SHOWN_KEYS = 6


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    attn_implementation: str | None = "gim_fused",
    dtype: Any = None,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode, on CPU unless ``device_map`` says otherwise.

    Args:
        name_or_path: a local model folder, a Hugging Face model id already in the local cache, or
            ``None`` for fastgim's bundled default model (:data:`fastgim.DEFAULT_MODEL_DIR`).
        attn_implementation: ``"gim_fused"`` (fastgim's attention, the default), ``"eager"``, ``"sdpa"``...;
            ``None`` keeps transformers' choice.
        dtype: weights dtype (``torch.float32``, ``torch.bfloat16``, ...); ``None``: the checkpoint's
            (the default model: float32).
        trust_remote_code, local_files_only, model_kwargs: passed to ``from_pretrained``
            (e.g. ``device_map="auto"``). The default model is always loaded offline.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelLoadError: the folder or name does not exist, is not a model, has no tokenizer, or lacks
            weights that the causal-LM class would initialise at random (the message names them).
    """
    import fastgim  # noqa: F401  (registers "gim_fused" with transformers)

    source = _resolve(name_or_path)
    if name_or_path is None:
        local_files_only = True
    kwargs: dict[str, Any] = dict(model_kwargs, trust_remote_code=trust_remote_code)
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = _check_dtype(dtype)
    tokenizer = _load_tokenizer(source, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    model = _load_causal_lm(source, kwargs)
    return model.eval(), tokenizer


def check_input_length(model: Any, length: int) -> None:
    """Raise a ``ValueError`` naming both lengths when ``length`` tokens exceed the model's position limit."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        limit = getattr(text_config, name, None)
        if isinstance(limit, int) and limit > 0:
            if length > limit:
                raise ValueError(
                    f"the input has {length} tokens but {type(model).__name__} handles at most {limit} "
                    f"(config.{name} = {limit}); shorten the input to {limit} tokens or fewer"
                )
            return


# ---------------------------------------------------------------------- where the model is
def _resolve(name_or_path: str | os.PathLike | None) -> str:
    """The folder (or cached hub id) to load from; errors for missing folders and non-model folders."""
    if name_or_path is None:
        from fastgim.default_model import DEFAULT_MODEL_DIR, check_default_model_files

        check_default_model_files()
        return str(DEFAULT_MODEL_DIR)
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelLoadError(f"the model must be a folder or a model id, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _check_model_folder(path)
    if path.exists():
        raise ModelLoadError(f"model {str(name_or_path)!r} is a file, not a model folder; pass the folder holding "
                             "config.json, the weights and the tokenizer files")
    if not _HUB_ID.match(str(name_or_path)) or str(name_or_path).startswith((".", "~")):
        raise ModelLoadError(f"model folder {str(name_or_path)!r} does not exist; pass a folder holding "
                             "config.json, the weights and the tokenizer files (or omit it for the bundled model)")
    return str(name_or_path)  # a hub id: found in the local cache, or an error from _hub_error


def _check_model_folder(path: Path) -> str:
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{str(path)!r} is not a model folder: it has no config.json. A Hugging Face model folder holds "
            "config.json, the weights (*.safetensors) and the tokenizer files, as written by save_pretrained()"
        )
    if not any(next(path.glob(pattern), None) is not None for pattern in _WEIGHT_FILES):
        raise ModelLoadError(f"model folder {str(path)!r} has a config.json but no weights (*.safetensors or "
                             "pytorch_model.bin); save the model there with model.save_pretrained()")
    return str(path)


def _hub_error(source: str, error: Exception) -> ModelLoadError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(source).is_dir():
        return ModelLoadError(f"cannot load the model in {source!r}: {first_line}")
    return ModelLoadError(
        f"cannot load {source!r}: it is not a local folder, and as a Hugging Face model id it is not in the local "
        f"cache (or cannot be downloaded here): {first_line}. Pass a local model folder instead"
    )


# ---------------------------------------------------------------------- tokenizer and model
def _load_tokenizer(source: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        with _quiet_loading():
            return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        if Path(source).is_dir():
            raise ModelLoadError(
                f"cannot load a tokenizer from {source!r} ({str(error).strip().splitlines()[0]}); the folder "
                "needs the tokenizer files (tokenizer.json / tokenizer_config.json), as written by "
                "tokenizer.save_pretrained()"
            ) from None
        raise _hub_error(source, error) from None


def _load_causal_lm(source: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_loading() as reports:
            model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except RuntimeError as error:  # e.g. weights of the wrong shape: the report, which was held back, says which
        detail = "\n".join(reports) or str(error)
        raise ModelLoadError(f"cannot load the model in {source!r}: {error}\n{detail}") from None
    except OSError as error:
        raise _hub_error(source, error) from None
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        raise ModelLoadError(
            f"{source!r} holds a model that transformers cannot load as a causal language model "
            f"({str(error).splitlines()[0]}); load it with transformers.AutoModel and explain a score of its "
            "outputs with fastgim.attribute(model, ..., target=callable(outputs) -> Tensor[batch])"
        ) from None
    _check_loading_info(model, source, info)
    return model


def _check_loading_info(model: Any, source: str, info: dict[str, Any]) -> None:
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(key[0]) if isinstance(key, tuple) else str(key) for key in info.get("mismatched_keys") or [])
    fresh = missing + mismatched
    if fresh:
        raise ModelLoadError(
            f"{source!r} has no trained weights for {len(fresh)} parameter(s) of {type(model).__name__}: "
            f"{_listing(fresh)}. Loading it as a causal LM would initialise them at random (for an encoder "
            "checkpoint: a random LM head), and its predictions would mean nothing. Load the model with "
            "transformers.AutoModel and explain a score of its outputs with "
            "fastgim.attribute(model, ..., target=callable(outputs) -> Tensor[batch]), e.g. a similarity"
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        warnings.warn(
            f"{source!r}: {len(unexpected)} weight(s) in the checkpoint are not used by {type(model).__name__}: "
            f"{_listing(unexpected)}", UserWarning, stacklevel=4,
        )


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def _check_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, dtype)
    if dtype != "auto" and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ModelLoadError(f"dtype must be a floating torch.dtype such as torch.float32 (or 'auto'), got {dtype!r}")
    return dtype


class _HoldBackLoadReport(logging.Filter):
    """Drops transformers' LOAD REPORT records (checked by :func:`_check_loading_info`), keeping their text."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" in message:
            self.reports.append(message)
            return False
        return True


@contextlib.contextmanager
def _quiet_loading() -> Iterator[list[str]]:
    """No "Loading weights" bar and no load report for the block; both restored afterwards."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hold_back = _HoldBackLoadReport()
    handlers = list(logging.getLogger("transformers").handlers)
    hf_logging.disable_progress_bar()
    for handler in handlers:
        handler.addFilter(hold_back)
    try:
        yield hold_back.reports
    finally:
        for handler in handlers:
            handler.removeFilter(hold_back)
        if bar:
            hf_logging.enable_progress_bar()
