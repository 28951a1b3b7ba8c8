"""inteprelens 0.2.1's module tree on fastgim: replace ``inteprelens`` by ``fastgim.inteprelens`` in imports.

Every name here is fastgim's own object (no copies); the top-level names are also importable from
``fastgim`` directly. Deliberate differences are options of those objects, listed in the README
("Coming from inteprelens").
"""

from fastgim.chg import (
    CHG,
    CausalCircuitAttribution,
    CHGDataset,
    CHGResults,
    CHGTrainer,
    MaskedSequenceDataset,
)
from fastgim.hooks import (
    autograd_node_hook,
    capture_backward_pre,
    capture_gradients,
    capture_kwargs_hook,
    tensor_grad_hook,
)
from fastgim.interventions import InterventionSpec, apply_interventions
from fastgim.lens import LensAPI
from fastgim.scoring import (
    apply_temperature,
    gather_token_scores,
    logits_to_log_probs,
    logits_to_probs,
    select_final_token,
)
from fastgim.sentence_spans import aggregate_to_sentences, get_sentence_token_spans
from fastgim.sites import ALL_SITES, GLOBAL_SITES, LAYER_SITES, SITE_SPECS
from fastgim.tracing import LayerSiteKey, SiteRequest, TokenScores, TraceResult, TransformerTracer

__all__ = [
    "LensAPI", "CHG", "CHGTrainer", "TransformerTracer", "TraceResult", "SiteRequest", "LayerSiteKey", "ALL_SITES",
    "LAYER_SITES", "GLOBAL_SITES", "SITE_SPECS", "InterventionSpec", "apply_interventions", "TokenScores",
    "logits_to_log_probs", "logits_to_probs", "apply_temperature", "select_final_token", "gather_token_scores",
    "CausalCircuitAttribution", "autograd_node_hook", "capture_backward_pre", "capture_gradients",
    "capture_kwargs_hook", "tensor_grad_hook", "CHGDataset", "MaskedSequenceDataset", "CHGResults",
    "get_sentence_token_spans", "aggregate_to_sentences",
]
