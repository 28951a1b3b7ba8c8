"""``inteprelens.core.tracer``."""

from fastgim.tracing import TransformerTracer

__all__ = ["TransformerTracer"]
