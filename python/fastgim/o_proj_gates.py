"""Head gates applied by forward pre-hooks on the attention output projections (inteprelens' way).

The input of a decoder layer's attention output projection (``o_proj`` / ``c_proj`` / ``dense``) is
the concatenation of the head outputs, ``(batch, seq, num_heads * head_dim)``, head-major. Gating head
``h`` of layer ``l`` multiplies the slice ``[h * head_dim, (h + 1) * head_dim)`` by ``gates[:, l, h]``:
the same product the fused attention gate (:func:`fastgim.integrations.hf.head_gates`) forms inside
the attention op, so both give the same model output up to rounding. This path needs only an adapter
(``get_layers`` and ``get_attention_output_proj``), so it also serves models whose attention does not
route through transformers' ``AttentionInterface``, and it leaves the model's own attention untouched
(what ``CHGTrainer(numerics="inteprelens")`` needs to reproduce inteprelens' numerics).

One pre-hook per projection module is installed by the first block that needs it and removed by the
last (:func:`fastgim.model_patches.shared_patch`); it reads the gates of the current call from a
context variable, so it does nothing in calls outside :func:`o_proj_head_gates` (other threads
included), and nothing is left on the model after the block, errors included.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from fastgim import validation
from fastgim.model_patches import shared_patch

__all__ = ["o_proj_head_gates", "active"]


@dataclasses.dataclass(frozen=True)
class _CallGates:
    gates: torch.Tensor  # (num_layers, num_heads) or (rows, num_layers, num_heads)
    layer_of: dict[int, int]  # id(projection module) -> layer index
    num_heads: int
    head_dim: int
    dtype: torch.dtype | None


_CURRENT: contextvars.ContextVar[_CallGates | None] = contextvars.ContextVar("fastgim_o_proj_gates", default=None)


def active() -> bool:
    """True inside an :func:`o_proj_head_gates` block (of this thread / task)."""
    return _CURRENT.get() is not None


def _gate_input(module: nn.Module, args: tuple) -> tuple | None:
    state = _CURRENT.get()
    layer = None if state is None else state.layer_of.get(id(module))
    if layer is None or not args:
        return None
    x = args[0]
    width = state.num_heads * state.head_dim
    if x.dim() != 3 or x.shape[-1] != width:
        raise ValueError(
            f"the attention output projection of layer {layer} ({type(module).__name__}) got input "
            f"{tuple(x.shape)}, expected (batch, seq, num_heads * head_dim = {state.num_heads} * {state.head_dim}); "
            "check the adapter's get_attention_output_proj, num_heads and head_dim"
        )
    gates = state.gates if state.gates.dim() == 3 else state.gates.unsqueeze(0)
    if state.gates.dim() == 3 and gates.shape[0] != x.shape[0]:
        raise ValueError(f"head gates have {gates.shape[0]} rows but the model input has batch {x.shape[0]}")
    gate = gates[:, layer].unsqueeze(1).unsqueeze(-1)  # (rows, 1, H, 1)
    gate = gate.to(device=x.device, dtype=state.dtype or x.dtype)
    gated = x.view(x.shape[0], x.shape[1], state.num_heads, state.head_dim) * gate  # out of place: autograd-safe
    return (gated.view(x.shape), *args[1:])


def _install(module: nn.Module):
    handle = module.register_forward_pre_hook(_gate_input)
    return handle.remove


@contextlib.contextmanager
def o_proj_head_gates(adapter, gates: torch.Tensor, num_heads: int | None = None, head_dim: int | None = None,
                      dtype: torch.dtype | None = None) -> Iterator[None]:
    """Gate every attention head through pre-hooks on the adapter's output projections for the block.

    Args:
        adapter: a :class:`fastgim.adapters.ModelAdapter` (or subclass) of the model.
        gates: ``(num_layers, num_heads)`` shared by the batch or ``(batch, num_layers, num_heads)``, values
            in ``[0, 1]``; may require grad.
        num_heads, head_dim: the head split of the projection input (default: the adapter's).
        dtype: the dtype the gates are cast to before the product (default: the projection input's);
            inteprelens casts them to the model's parameter dtype.
    """
    validation.gates(gates)
    layers = list(adapter.get_layers())
    modules = [adapter.get_o_proj(layer) for layer in layers]
    if gates.dim() not in (2, 3) or gates.shape[-2] != len(layers):
        raise ValueError(f"head gates must be (num_layers, num_heads) or (batch, num_layers, num_heads) with "
                         f"num_layers = {len(layers)}, got {tuple(gates.shape)}")
    heads = int(num_heads if num_heads is not None else adapter.num_heads)
    if gates.shape[-1] != heads:
        raise ValueError(f"head gates have {gates.shape[-1]} heads per layer, the model has {heads}")
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(adapter).__name__}.get_attention_output_proj(layer {index}) returned "
                            f"{type(module).__name__}, not a module")
    state = _CallGates(gates, {id(m): i for i, m in enumerate(modules)}, heads,
                       int(head_dim if head_dim is not None else adapter.head_dim), dtype)
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(shared_patch(module, "o_proj_head_gate", lambda module=module: _install(module)))
        token = _CURRENT.set(state)
        stack.callback(_CURRENT.reset, token)
        yield
