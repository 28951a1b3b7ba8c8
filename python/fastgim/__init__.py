"""fastgim: fast, exact GIM attribution and Causal Head Gating for Hugging Face LLMs.

``import fastgim`` registers the ``"gim_fused"`` attention implementation with
transformers (attention and mask registries).

The import itself is light (no torch, no transformers): every public name is served lazily from
its module on first use, and the registration runs as soon as transformers' model code
(``transformers.modeling_utils``, where ``AttentionInterface`` lives) is imported, or at once
when it already is. So ``fastgim --help`` answers without loading torch, and a model loaded
with ``attn_implementation="gim_fused"`` after ``import fastgim`` always finds it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from typing import Any

__version__ = "0.1.0"

# Public names served lazily from their modules, so that importing fastgim stays light.
_LAZY = {
    "attention": "fastgim.ops",
    "attention_with_lse": "fastgim.ops",
    "GIMSettings": "fastgim.settings",
    "current_settings": "fastgim.settings",
    "GIM": "fastgim.gim",
    "load_default_model": "fastgim.default_model",
    "DEFAULT_MODEL_DIR": "fastgim.default_model",
    "load_model": "fastgim.loading",
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

#: Public functions that share their name with a submodule: the function wins on the package.
_FUNCTIONS_NAMED_LIKE_MODULES = {"explain": "fastgim.explain"}

__all__ = ["explain", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS_NAMED_LIKE_MODULES:
        return getattr(importlib.import_module(_FUNCTIONS_NAMED_LIKE_MODULES[name]), name)
    module_name = _LAZY.get(name)
    if module_name is not None:
        return getattr(importlib.import_module(module_name), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # e.g. fastgim.default_model, fastgim.integrations
    raise AttributeError(f"module 'fastgim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """fastgim's module type: importing the submodule ``fastgim.explain`` keeps ``fastgim.explain`` the function.

    The import system binds every imported submodule as an attribute of its package; for the names in
    ``_FUNCTIONS_NAMED_LIKE_MODULES`` that binding is skipped, so the attribute stays lazy (the function).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _FUNCTIONS_NAMED_LIKE_MODULES.get(name) == value.__name__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


# ---------------------------------------------------------------------- registration with transformers
_HOOKED_MODULE = "transformers.modeling_utils"  # defines AttentionInterface; every model class imports it


def _register_with_transformers() -> None:
    from fastgim.integrations import hf

    hf.register()


def _register_after_import() -> None:
    try:
        _register_with_transformers()
    except Exception as error:  # never break the user's transformers import; say what is missing
        warnings.warn(f"fastgim could not register attn_implementation='gim_fused' with transformers: {error!r}",
                      RuntimeWarning, stacklevel=2)


class _RegisterWhenTransformersLoads:
    """Post-import hook (a ``sys.meta_path`` finder; not derived from ``importlib.abc``, whose import costs more than
    the rest of ``import fastgim``): registers ``gim_fused`` right after ``transformers.modeling_utils`` has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _HOOKED_MODULE:
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            execute(module)
            _register_after_import()

        spec.loader.exec_module = exec_module  # this loader instance serves this one module
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterWhenTransformersLoads)]


def _install_registration() -> None:
    if _HOOKED_MODULE in sys.modules:
        _register_with_transformers()
    elif importlib.util.find_spec("transformers") is not None:  # the op still works without transformers
        _remove_hook()
        sys.meta_path.insert(0, _RegisterWhenTransformersLoads())


_install_registration()
