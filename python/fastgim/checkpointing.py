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
import inspect
from collections.abc import Callable, Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from fastgim.function_mode import run_under_active_mode
from fastgim.model_patches import shared_patch

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


#: Per call: ``id`` of every block (and config-carrying module) that this call checkpoints.
_CHECKPOINTED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "fastgim_checkpointed", default=frozenset()
)


def _checkpointed(block: nn.Module, forward):
    def run(*args, **kwargs):
        if id(block) not in _CHECKPOINTED.get():
            return forward(*args, **kwargs)
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


def _cache_carriers(model: nn.Module) -> list[nn.Module]:
    """``model`` and its submodules whose config carries ``use_cache`` (they build a KV cache by default)."""
    return [module for module in model.modules() if hasattr(getattr(module, "config", None), "use_cache")]


def _no_cache_by_default(module: nn.Module, args: tuple, kwargs: dict | None = None):
    """Forward pre-hook: ``use_cache=False`` unless the caller chose, in calls that checkpoint ``module``.

    ``kwargs`` is None when another thread's forward reads the module's hooks while this hook is being
    registered (PyTorch adds it to the hooks before marking it as taking kwargs); such a call is not one
    that checkpoints (the calling thread registers the hook before its own forward), so it is left alone.
    """
    if kwargs is None or id(module) not in _CHECKPOINTED.get() or kwargs.get("use_cache") is not None:
        return None
    if "use_cache" not in inspect.signature(module.forward).parameters:
        return None
    return args, {**kwargs, "use_cache": False}


def _install(model: nn.Module) -> Callable[[], None]:
    """Checkpointing forwards on the blocks and the no-cache hooks, inert outside :func:`checkpoint_layers`."""
    blocks = list(transformer_blocks(model))
    foreign = [block for block in blocks if "forward" in block.__dict__]
    if foreign:
        raise RuntimeError(f"{type(foreign[0]).__name__}.forward is already patched; cannot checkpoint it")
    for block in blocks:
        block.forward = _checkpointed(block, block.forward)
    handles = [m.register_forward_pre_hook(_no_cache_by_default, with_kwargs=True) for m in _cache_carriers(model)]

    def undo() -> None:
        for handle in handles:
            handle.remove()
        for block in blocks:
            del block.forward

    return undo


@contextlib.contextmanager
def checkpoint_layers(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Recompute each transformer block in the backward instead of storing its activations.

    In the block, the model is called with ``use_cache=False`` unless the caller passes it (a KV cache
    written in the forward would be written again by the recomputation); calling the model with a
    cache is an error. The patches are installed once per model (reference counted) and act only in
    the calls made inside this block (a context variable), so concurrent and nested blocks, and plain
    calls in other threads, are unaffected; the model's configs are never changed.
    """
    if not enabled:
        yield model
        return
    with shared_patch(model, "checkpoint_layers", lambda: _install(model)):
        ids = {id(block) for block in transformer_blocks(model)} | {id(m) for m in _cache_carriers(model)}
        token = _CHECKPOINTED.set(_CHECKPOINTED.get() | ids)
        try:
            yield model
        finally:
            _CHECKPOINTED.reset(token)
