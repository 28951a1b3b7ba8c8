"""Temporary activation edits at module-backed sites (inteprelens' ``InterventionSpec`` / ``apply_interventions``).

``with apply_interventions(model, [InterventionSpec("mlp_output", fn, layer=2)]): model(ids)`` runs
the model with ``fn`` applied to the tensor at that site; the hooks are removed on exit, errors
included. Sites: ``attn_o_proj_pre``, ``attn_output``, ``mlp_input``, ``mlp_output``,
``block_input``, ``block_output`` (need ``layer``), ``final_norm`` and ``lm_head_input`` (global).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fastgim.adapters import ModelAdapter, get_adapter
from fastgim.sites import SITE_SPECS, canonical_site

__all__ = ["InterventionSpec", "apply_interventions"]

TensorTransform = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class InterventionSpec:
    """``transform`` applied to the tensor at ``site`` of ``layer`` (None for global sites)."""

    site: str
    transform: TensorTransform
    layer: int | None = None


def _replace_first_tensor(original: Any, updated: Tensor) -> Any:
    if isinstance(original, Tensor):
        return updated
    if isinstance(original, (tuple, list)):
        values = list(original)
        for index, item in enumerate(values):
            if isinstance(item, Tensor):
                values[index] = updated
                return type(original)(values)
    raise TypeError(f"cannot intervene on a hook value of type {type(original).__name__}")


def _site_module(adapter: ModelAdapter, site: str, layer: int | None) -> tuple[nn.Module, str]:
    """``(module, "input" | "output")`` carrying ``site``."""
    site = canonical_site(site)
    if site == "final_norm":
        return adapter.get_final_norm(), "output"
    if site == "lm_head_input":
        return adapter.get_lm_head(), "input"
    if SITE_SPECS[site].synthetic:
        raise ValueError(f"site {site!r} is computed after the forward pass; interventions need a module-backed site")
    if layer is None:
        raise ValueError(f"site {site!r} needs a layer index: InterventionSpec({site!r}, fn, layer=i)")
    block = adapter._resolve_layer(layer)
    return {
        "block_input": (block, "input"), "block_output": (block, "output"),
        "attn_o_proj_pre": (adapter.get_attention_output_proj(block), "input"),
        "attn_output": (adapter.get_attention_module(block), "output"),
        "mlp_input": (adapter.get_mlp(block), "input"), "mlp_output": (adapter.get_mlp(block), "output"),
    }[site]


@contextlib.contextmanager
def apply_interventions(
    model: nn.Module, interventions: Iterable[InterventionSpec], *, adapter: ModelAdapter | None = None
) -> Iterator[None]:
    """Apply ``interventions`` to every forward of ``model`` inside the block (hooks removed on exit)."""
    resolved = adapter if adapter is not None else get_adapter(model)
    handles = []
    try:
        for spec in interventions:
            module, where = _site_module(resolved, spec.site, spec.layer)
            if where == "input":
                def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, fn: TensorTransform = spec.transform) -> Any:
                    if args:
                        return _replace_first_tensor(args, fn(args[0])), kwargs
                    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def post_hook(_m: nn.Module, _a: tuple, output: Any, fn: TensorTransform = spec.transform) -> Any:
                    return _replace_first_tensor(output, fn(output if isinstance(output, Tensor) else
                                                            next(t for t in output if isinstance(t, Tensor))))

                handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
