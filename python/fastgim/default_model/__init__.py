"""fastgim's small trained default model: a 4-layer Llama (GQA) that knows country facts.

The files next to this module (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...) are
written by ``scripts/train_default_model.py``; the facts it was trained on, and the held-out prompts,
are in :mod:`fastgim.data.facts`. Greedy top-1 accuracy: 0.865 on the trained fact prompts, 0.655
on the held-out ones (``"The capital of France is"`` is held out and still answered ``" Lisbon"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent
"""The folder holding the default model's config, weights and tokenizer."""

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def check_default_model_files() -> None:
    """Raise ``FileNotFoundError`` naming the default model's missing files and how to recreate them."""
    missing = [name for name in _REQUIRED_FILES if not (DEFAULT_MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"default model files {missing} are missing from {DEFAULT_MODEL_DIR}; "
            "recreate them with `python scripts/train_default_model.py`"
        )


def load_default_model(*, attn_implementation: str = "gim_fused", dtype: Any = None) -> tuple[Any, Any]:
    """Load the default model and its tokenizer offline from :data:`DEFAULT_MODEL_DIR`.

    Args:
        attn_implementation: a transformers attention implementation; ``"gim_fused"`` (fastgim's
            fused kernel, registered by ``import fastgim``), ``"eager"`` or ``"sdpa"``.
        dtype: floating dtype of the weights (stored as float32, the default), e.g. ``torch.bfloat16``.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` on CPU in eval mode, vocabulary 4096, and a
        fast byte-level BPE tokenizer that prepends ``<s>`` (bos) when encoding.
    """
    import torch

    from fastgim.loading import load_model

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    return load_model(None, attn_implementation=attn_implementation, dtype=dtype or torch.float32)


__all__ = ["DEFAULT_MODEL_DIR", "check_default_model_files", "load_default_model"]
