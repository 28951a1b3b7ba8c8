"""inteprelens 0.2.1's module tree on fastgim: replace ``inteprelens`` by ``fastgim.inteprelens`` in imports.

Every name here is fastgim's own object (no copies); the top-level names are also importable from
``fastgim`` directly. Deliberate differences are options of those objects, listed in the README
("Coming from inteprelens").
"""

from fastgim.chg import CausalCircuitAttribution, CHGDataset, CHGResults, MaskedSequenceDataset
from fastgim.inteprelens.core import (
    ALL_SITES,
    CHG,
    GLOBAL_SITES,
    LAYER_SITES,
    SITE_SPECS,
    CHGTrainer,
    InterventionSpec,
    LayerSiteKey,
    SiteRequest,
    TokenScores,
    TraceResult,
    TransformerTracer,
    apply_interventions,
    apply_temperature,
    autograd_node_hook,
    capture_backward_pre,
    capture_gradients,
    capture_kwargs_hook,
    gather_token_scores,
    logits_to_log_probs,
    logits_to_probs,
    select_final_token,
    tensor_grad_hook,
)
from fastgim.lens import LensAPI
from fastgim.sentence_spans import aggregate_to_sentences, get_sentence_token_spans

__all__ = [
    "LensAPI", "CHG", "CHGTrainer", "TransformerTracer", "TraceResult", "SiteRequest", "LayerSiteKey", "ALL_SITES",
    "LAYER_SITES", "GLOBAL_SITES", "SITE_SPECS", "InterventionSpec", "apply_interventions", "TokenScores",
    "logits_to_log_probs", "logits_to_probs", "apply_temperature", "select_final_token", "gather_token_scores",
    "CausalCircuitAttribution", "autograd_node_hook", "capture_backward_pre", "capture_gradients",
    "capture_kwargs_hook", "tensor_grad_hook", "CHGDataset", "MaskedSequenceDataset", "CHGResults",
    "get_sentence_token_spans", "aggregate_to_sentences",
]
