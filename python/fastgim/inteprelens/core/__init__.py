"""``inteprelens.core``: fastgim's tracing, scoring, interventions, hooks and CHG."""

from fastgim.chg import CHG, CHGTrainer
from fastgim.hooks import (
    autograd_node_hook,
    capture_backward_pre,
    capture_gradients,
    capture_kwargs_hook,
    tensor_grad_hook,
)
from fastgim.interventions import InterventionSpec, apply_interventions
from fastgim.scoring import (
    apply_temperature,
    gather_token_scores,
    logits_to_log_probs,
    logits_to_probs,
    select_final_token,
)
from fastgim.sites import ALL_SITES, GLOBAL_SITES, LAYER_SITES, SITE_SPECS
from fastgim.tracing import LayerSiteKey, SiteRequest, TokenScores, TraceResult, TransformerTracer

__all__ = [
    "ALL_SITES", "CHG", "autograd_node_hook", "capture_backward_pre", "capture_gradients", "capture_kwargs_hook",
    "tensor_grad_hook", "CHGTrainer", "GLOBAL_SITES", "InterventionSpec", "LAYER_SITES", "LayerSiteKey", "SITE_SPECS",
    "SiteRequest", "TokenScores", "TraceResult", "TransformerTracer", "apply_temperature", "apply_interventions",
    "gather_token_scores", "logits_to_log_probs", "logits_to_probs", "select_final_token",
]
