"""``inteprelens.core.residuals``."""

from __future__ import annotations

from torch import nn

from fastgim.adapters import ModelAdapter

__all__ = ["resolve_post_attention_anchor"]


def resolve_post_attention_anchor(adapter: ModelAdapter, layer: nn.Module) -> nn.Module:
    """The module whose input is the residual stream after attention: :meth:`ModelAdapter.post_attention_anchor`."""
    return adapter.post_attention_anchor(layer)
