"""fastgim: fast, exact GIM attribution and Causal Head Gating for Hugging Face LLMs.

``import fastgim`` registers the ``"gim_fused"`` attention implementation with
transformers (attention and mask registries).
"""

from __future__ import annotations

import importlib
from typing import Any

from fastgim.ops import attention, attention_with_lse
from fastgim.settings import GIMSettings, current_settings

__version__ = "0.1.0"

# Public names served lazily from their modules, so that importing fastgim stays light.
_LAZY = {
    "GIM": "fastgim.gim",
    "load_default_model": "fastgim.default_model",
    "DEFAULT_MODEL_DIR": "fastgim.default_model",
    "attribute": "fastgim.attribution",
    "Attribution": "fastgim.attribution",
    "evaluate": "fastgim.evaluation",
    "CHG": "fastgim.chg",
    "CHGTrainer": "fastgim.chg",
    "CHGResults": "fastgim.chg",
    "CHGDataset": "fastgim.chg",
    "LensAPI": "fastgim.lens",
    "TransformerTracer": "fastgim.tracing",
    "CausalCircuitAttribution": "fastgim.chg",
    "capture_gradients": "fastgim.hooks",
    "capture_backward_pre": "fastgim.hooks",
    "capture_kwargs_hook": "fastgim.hooks",
    "tensor_grad_hook": "fastgim.hooks",
    "autograd_node_hook": "fastgim.hooks",
    "component_attribution": "fastgim.circuits",
    "edge_attribution": "fastgim.circuits",
    "attribute_dataset": "fastgim.distributed",
    # inteprelens 0.2.1's other public names (see fastgim.inteprelens for its module paths)
    "TraceResult": "fastgim.tracing",
    "TokenScores": "fastgim.tracing",
    "SiteRequest": "fastgim.tracing",
    "LayerSiteKey": "fastgim.tracing",
    "ALL_SITES": "fastgim.sites",
    "LAYER_SITES": "fastgim.sites",
    "GLOBAL_SITES": "fastgim.sites",
    "SITE_SPECS": "fastgim.sites",
    "InterventionSpec": "fastgim.interventions",
    "apply_interventions": "fastgim.interventions",
    "logits_to_log_probs": "fastgim.scoring",
    "logits_to_probs": "fastgim.scoring",
    "apply_temperature": "fastgim.scoring",
    "select_final_token": "fastgim.scoring",
    "gather_token_scores": "fastgim.scoring",
    "MaskedSequenceDataset": "fastgim.chg",
    "get_sentence_token_spans": "fastgim.sentence_spans",
    "aggregate_to_sentences": "fastgim.sentence_spans",
}

__all__ = ["attention", "attention_with_lse", "explain", "GIMSettings", "current_settings", *_LAZY]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fastgim' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


def _register_with_transformers() -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:  # the op still works on its own
        return
    from fastgim import hf

    hf.register()


_register_with_transformers()

# Bound eagerly: the submodule fastgim.explain would otherwise shadow the function on first import.
from fastgim.explain import explain  # noqa: E402
