"""Per-layer activation checkpointing for attribution (long contexts).

transformers' own gradient checkpointing only runs in training mode; attribution runs
in eval mode, so :func:`checkpoint_layers` wraps each transformer block's forward in
``torch.utils.checkpoint`` (non-reentrant) for the duration of a block. Only each
block's input is kept; its internals are recomputed in the backward, one block at a
time. Cost: one extra forward pass (about +30-40% time for forward + backward),
saving every per-block activation (MLP intermediates dominate at long context).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from fastgim.function_mode import run_under_active_mode

_LAYER_LISTS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                "encoder.layer", "bert.encoder.layer", "layers", "h")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (decoder layers / encoder layers)."""
    for dotted in _LAYER_LISTS:
        module: nn.Module | None = model
        for name in dotted.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise TypeError(
        f"cannot find the transformer blocks of {type(model).__name__} (looked for {', '.join(_LAYER_LISTS)})"
    )


# The name under which a block receives the KV cache: ``cache`` since transformers 5.2x (deprecated alias
# ``past_key_values``), ``past_key_values`` / ``past_key_value`` / ``layer_past`` before.
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _is_cache(value: object) -> bool:
    """True for a transformers ``Cache`` (whatever the argument is called, should it be renamed again)."""
    return any(cls.__name__ == "Cache" and cls.__module__.endswith("cache_utils") for cls in type(value).__mro__)


def _given_cache(args: tuple, kwargs: dict) -> object | None:
    named = next((kwargs[name] for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
    return named if named is not None else next((v for v in (*args, *kwargs.values()) if _is_cache(v)), None)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if _given_cache(args, kwargs) is not None:
            raise RuntimeError(
                "checkpoint_layers: the model was called with a KV cache (use_cache=True or past_key_values); "
                "recomputing a block in the backward would write its keys and values into the cache twice and "
                "attend to them. Call the model with use_cache=False and no past_key_values."
            )
        # The recomputation may run on an autograd worker thread (CUDA), where the context variables
        # set around the forward (GIM settings, head gates) would be unset: run it in the forward's context.
        # The backward runs with no torch function mode: re-enter fastgim's GIM function mode, if any.
        context = contextvars.copy_context()
        return checkpoint(lambda *a, **k: context.run(run_under_active_mode, forward, *a, **k), *args,
                          use_reentrant=False, **kwargs)

    return run


def _configs(model: nn.Module) -> list:
    """The distinct configs of ``model`` and its submodules that carry ``use_cache``."""
    found: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            found.setdefault(id(config), config)
    return list(found.values())


@contextlib.contextmanager
def checkpoint_layers(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Recompute each transformer block in the backward instead of storing its activations.

    For the block, the model's configs default to ``use_cache=False`` (a KV cache written in the forward
    would be written again by the recomputation); calling the model with an explicit cache is an error.
    """
    if not enabled:
        yield model
        return
    blocks = list(transformer_blocks(model))
    patched = []
    configs = [(config, config.use_cache) for config in _configs(model)]
    try:
        for block in blocks:
            if "forward" in block.__dict__:
                raise RuntimeError(f"{type(block).__name__}.forward is already patched; cannot checkpoint it")
            block.forward = _checkpointed(block.forward)
            patched.append(block)
        for config, _ in configs:
            config.use_cache = False
        yield model
    finally:
        for config, flag in configs:
            config.use_cache = flag
        for block in patched:
            del block.forward
