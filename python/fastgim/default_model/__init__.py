"""fastgim's small trained default model: a 4-layer Llama (GQA) that knows country facts.

The files next to this module (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...) are
written by ``scripts/train_default_model.py``; the facts it was trained on, and the held-out prompts,
are in :mod:`fastgim.data.facts`. Greedy top-1 accuracy: 0.865 on the trained fact prompts, 0.655
on the held-out ones (``"The capital of France is"`` is held out and still answered ``" Lisbon"``).
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent
"""The folder holding the default model's config, weights and tokenizer."""

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def load_default_model(
    *, attn_implementation: str = "gim_fused", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object]:
    """Load the default model and its tokenizer offline from :data:`DEFAULT_MODEL_DIR`.

    Args:
        attn_implementation: a transformers attention implementation; ``"gim_fused"`` (fastgim's
            fused kernel, registered by ``import fastgim``), ``"eager"`` or ``"sdpa"``.
        dtype: floating dtype of the weights (stored as float32), e.g. ``torch.bfloat16``.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` on CPU in eval mode, vocabulary 4096, and a
        fast byte-level BPE tokenizer that prepends ``<s>`` (bos) when encoding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastgim  # noqa: F401  (registers "gim_fused" with transformers)

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    missing = [name for name in _REQUIRED_FILES if not (DEFAULT_MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"default model files {missing} are missing from {DEFAULT_MODEL_DIR}; "
            "recreate them with `python scripts/train_default_model.py`"
        )
    model = AutoModelForCausalLM.from_pretrained(
        DEFAULT_MODEL_DIR, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    model.eval()
    return model, tokenizer


__all__ = ["DEFAULT_MODEL_DIR", "load_default_model"]
