"""``inteprelens.core.logits``: logit-lens projections."""

from fastgim.adapters import ModelAdapter
from fastgim.tracing import apply_final_norm, project_hidden_to_logits, project_layer_logits, select_layers

__all__ = ["apply_final_norm", "project_hidden_to_logits", "project_layer_logits", "select_layers"]
