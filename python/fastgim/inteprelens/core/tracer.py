"""``inteprelens.core.tracer``."""

from fastgim.adapters import ModelAdapter, get_adapter
from fastgim.inteprelens.core.residuals import resolve_post_attention_anchor
from fastgim.sites import ALL_SITES, SiteName
from fastgim.tracing import TraceResult, TransformerTracer, project_layer_logits

__all__ = ["TransformerTracer"]
