"""Token scoring helpers (inteprelens' ``core.probabilities``): temperature, log-probs, final tokens.

The formulas are inteprelens' (``log_softmax`` of ``logits / T``, ``probs = exp(log_probs)``), so the
values are the same bits on the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["apply_temperature", "logits_to_log_probs", "logits_to_probs", "select_final_token",
           "gather_token_scores"]


def apply_temperature(logits: Tensor, temperature: float | None = None) -> Tensor:
    """``logits / temperature`` (the tensor itself for ``None`` or 1.0); raises for ``temperature <= 0``."""
    if temperature is None:
        return logits
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if temperature == 1.0:
        return logits
    return logits / temperature


def logits_to_log_probs(logits: Tensor, temperature: float | None = None) -> Tensor:
    """``log_softmax(logits / temperature)`` over the last axis, same shape and dtype as ``logits``."""
    return F.log_softmax(apply_temperature(logits, temperature=temperature), dim=-1)


def logits_to_probs(logits: Tensor, temperature: float | None = None) -> Tensor:
    """``exp(logits_to_log_probs(logits, temperature))``, same shape and dtype as ``logits``."""
    return logits_to_log_probs(logits, temperature=temperature).exp()


def select_final_token(tensor: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Rows of ``tensor (B, L, ...)`` at each sequence's last real token: ``(B, ...)``.

    Without ``attention_mask`` the last position; with a ``(B, L)`` 0/1 mask the largest position
    holding a 1 (left and right padding alike).
    """
    if tensor.ndim < 2:
        raise ValueError(f"expected a tensor of shape (batch, seq, ...), got {tuple(tensor.shape)}")
    batch, length = tensor.shape[:2]
    if attention_mask is None:
        positions = torch.full((batch,), length - 1, dtype=torch.long, device=tensor.device)
    else:
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match the tensor's leading "
                             f"(batch, seq) = {(batch, length)}")
        mask = attention_mask.to(device=tensor.device, dtype=torch.long)
        if not bool(mask.any(dim=-1).all()):
            raise ValueError("attention_mask has a row with no real token; every row needs at least one")
        positions = (mask * torch.arange(length, device=tensor.device).unsqueeze(0)).amax(dim=-1)
    index = positions.view(batch, 1, *([1] * (tensor.ndim - 2))).expand(batch, 1, *tensor.shape[2:])
    return tensor.gather(dim=1, index=index).squeeze(1)


def gather_token_scores(scores: Tensor, token_ids: Tensor) -> Tensor:
    """``scores[..., token_ids]`` per position: ``scores (..., vocab)``, ``token_ids (...)`` -> ``(...)``."""
    if scores.ndim < 2:
        raise ValueError(f"expected scores with a vocabulary axis, got shape {tuple(scores.shape)}")
    if tuple(token_ids.shape) != tuple(scores.shape[:-1]):
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must match the scores without the vocabulary axis "
                         f"{tuple(scores.shape[:-1])}")
    index = token_ids.to(device=scores.device, dtype=torch.long).unsqueeze(-1)
    return scores.gather(dim=-1, index=index).squeeze(-1)
