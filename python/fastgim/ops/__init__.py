"""Fused ops: attention (flash forward, GIM backward) and its backends."""

from fastgim.ops.attention import attention, attention_with_lse, resolve_backend

__all__ = ["attention", "attention_with_lse", "resolve_backend"]
