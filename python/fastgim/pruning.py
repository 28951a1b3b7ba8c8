"""Skip the last transformer block's work at positions whose output nothing reads.

When a causal LM's logits are kept only at the target positions (``logits_to_keep``), the last
block's output at every other position reaches nothing: the final norm and the LM head are
per-position. So in that block

* the feed-forward module (per-position) runs on the target rows only, and
* attention (when the only target row is the last one) computes that query row only, against
  every key;

the other rows of their outputs are zeros. The scores, and so the gradients and attributions, are
the same as with the full block; the forward and backward save about one block of MLP and
attention work (1 / num_layers of the model). :func:`target_rows_only` is a context manager; it
installs nothing when the model's last block has no recognised feed-forward child.

The hooks are installed once per feed-forward module (reference counted) and act only in the calls
that asked for them (context variables hold each call's rows), so concurrent calls on one model, and
plain inference beside them, are unaffected.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch
from torch import nn

from fastgim.checkpointing import transformer_blocks
from fastgim.model_patches import shared_patch

#: Names of a transformer block's feed-forward child, across the supported families.
FEED_FORWARD_NAMES = ("mlp", "block_sparse_moe", "feed_forward")

#: ``id`` of each attention module that computes only the last query row (set by :func:`target_rows_only`).
LAST_QUERY_ONLY: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "fastgim_last_query_only", default=frozenset()
)


def _feed_forward(block: nn.Module) -> nn.Module | None:
    for name in FEED_FORWARD_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


#: Per call: ``id`` of the feed-forward module -> (rows to keep, the sequence length they index).
_KEEP_ROWS: contextvars.ContextVar[Mapping[int, tuple[torch.Tensor, int]]] = contextvars.ContextVar(
    "fastgim_keep_rows", default=MappingProxyType({})
)
#: Per call: for each feed-forward call in flight (innermost last), whether its input was sliced.
_SLICED: contextvars.ContextVar[tuple[bool, ...]] = contextvars.ContextVar("fastgim_rows_sliced", default=())


def _before(module: nn.Module, args: tuple):
    """Slice the ``(B, seq_len, H)`` input to the kept rows when this call asked for it."""
    keep = _KEEP_ROWS.get().get(id(module))
    hidden = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
    sliced = keep is not None and hidden is not None and hidden.dim() == 3 and hidden.shape[1] == keep[1]
    _SLICED.set((*_SLICED.get(), sliced))
    if not sliced:
        return None
    return (hidden.index_select(1, keep[0].to(hidden.device)),)


def _after(module: nn.Module, _args: tuple, output):
    """Zero-fill the rows :func:`_before` left out."""
    stack = _SLICED.get()
    _SLICED.set(stack[:-1])
    if not stack or not stack[-1]:
        return None
    rows, seq_len = _KEEP_ROWS.get()[id(module)]
    first = output[0] if isinstance(output, tuple) else output
    full = first.new_zeros(first.shape[0], seq_len, *first.shape[2:]).index_copy(1, rows.to(first.device), first)
    return (full, *output[1:]) if isinstance(output, tuple) else full


def _install_hooks(module: nn.Module):
    """Hooks on ``module`` that act only in calls that set :data:`_KEEP_ROWS` for it; returns the undo."""
    handles = [module.register_forward_pre_hook(_before), module.register_forward_hook(_after)]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


@contextlib.contextmanager
def target_rows_only(model: nn.Module, positions: torch.Tensor, seq_len: int) -> Iterator[bool]:
    """Compute the model's last block only at ``positions`` (the rows whose logits are kept).

    Args:
        model: a causal LM called with ``logits_to_keep`` covering ``positions`` and no KV cache.
        positions: the distinct target positions (sorted), ``0 <= p < seq_len``.
        seq_len: the input's sequence length.

    Yields:
        whether anything was installed (False when the last block has no recognised feed-forward).
    """
    try:
        block = transformer_blocks(model)[-1]
    except TypeError:
        block = None
    feed_forward = None if block is None else _feed_forward(block)
    if feed_forward is None:
        yield False
        return
    rows = positions.to(torch.long).flatten()
    last_only = rows.numel() == 1 and int(rows[0]) == seq_len - 1
    with shared_patch(feed_forward, "keep_rows", lambda: _install_hooks(feed_forward)):
        rows_token = _KEEP_ROWS.set({**_KEEP_ROWS.get(), id(feed_forward): (rows, seq_len)})
        query_token = LAST_QUERY_ONLY.set(frozenset(id(m) for m in block.modules()) if last_only else frozenset())
        try:
            yield True
        finally:
            LAST_QUERY_ONLY.reset(query_token)
            _KEEP_ROWS.reset(rows_token)
