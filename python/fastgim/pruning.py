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
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from fastgim.checkpointing import transformer_blocks

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


def _keep_rows_hooks(module: nn.Module, rows: torch.Tensor, seq_len: int) -> list:
    """Hooks that run ``module`` on ``rows`` of its ``(B, seq_len, H)`` input and zero-fill the rest."""
    state: dict[str, bool] = {}

    def before(_module: nn.Module, args: tuple):
        state["sliced"] = False
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            return None
        hidden = args[0]
        if hidden.shape[1] != seq_len:
            return None
        state["sliced"] = True
        return (hidden.index_select(1, rows.to(hidden.device)),)

    def after(_module: nn.Module, _args: tuple, output):
        if not state.pop("sliced", False):
            return None
        first = output[0] if isinstance(output, tuple) else output
        full = first.new_zeros(first.shape[0], seq_len, *first.shape[2:]).index_copy(1, rows.to(first.device), first)
        return (full, *output[1:]) if isinstance(output, tuple) else full

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


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
    handles = _keep_rows_hooks(feed_forward, rows, seq_len)
    last_only = rows.numel() == 1 and int(rows[0]) == seq_len - 1
    token = LAST_QUERY_ONLY.set(frozenset(id(m) for m in block.modules()) if last_only else frozenset())
    try:
        yield True
    finally:
        LAST_QUERY_ONLY.reset(token)
        for handle in handles:
            handle.remove()
