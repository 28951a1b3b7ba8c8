"""Hugging Face transformers integration: ``attn_implementation="gim_fused"``.

:func:`register` (called by ``import fastgim``) adds ``"gim_fused"`` to both
``AttentionInterface`` and ``AttentionMaskInterface``. Without the mask registration
transformers would build no mask at all for an unknown implementation and silently
drop padding and causality, so both are registered together.

The attention function calls :func:`fastgim.attention`, which reads the GIM settings
from the context variable set by :class:`fastgim.GIM`, and the per-(batch, head)
gates set by :func:`head_gates` (Causal Head Gating, head masks).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fastgim import validation
from fastgim.model_patches import shared_patch
from fastgim.ops.attention import attention
from fastgim.pruning import LAST_QUERY_ONLY
from fastgim.settings import current_settings

IMPLEMENTATION = "gim_fused"

SUPPORTED_FAMILIES = (
    "Llama", "Mistral", "Mixtral", "Qwen2", "Qwen2-MoE", "Qwen3", "Qwen3-MoE", "Gemma", "Gemma2", "Gemma3",
    "Phi3", "GPT-2", "GPT-NeoX", "OLMo", "OLMo2", "BERT",
    "and any transformers model whose attention routes through AttentionInterface",
)

_HEAD_GATES: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("fastgim_head_gates", default=None)


@contextlib.contextmanager
def head_gates(gates: torch.Tensor | None) -> Iterator[torch.Tensor | None]:
    """Multiply each attention head's output by a gate inside ``gim_fused`` attention.

    Args:
        gates: ``(num_layers, num_heads)`` (shared by the batch) or ``(batch, num_layers, num_heads)``,
            any float dtype, every value in ``[0, 1]`` (checked); may require grad (the gate gradient flows
            back through the op).
            ``None`` disables gating.
    """
    if gates is not None and gates.dim() not in (2, 3):
        raise ValueError(
            f"head gates must be (num_layers, num_heads) or (batch, num_layers, num_heads), got {tuple(gates.shape)}"
        )
    if gates is not None:
        validation.gates(gates)
    token = _HEAD_GATES.set(gates)
    try:
        yield gates
    finally:
        _HEAD_GATES.reset(token)


def _layer_gate(module: nn.Module, batch: int, heads: int, dtype: torch.dtype) -> torch.Tensor | None:
    gates = _HEAD_GATES.get()
    if gates is None:
        return None
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise RuntimeError(
            f"head gates need the attention module's layer_idx, but {type(module).__name__} has none"
        )
    if gates.shape[-2] <= layer_idx or gates.shape[-1] != heads:
        raise ValueError(
            f"head gates of shape {tuple(gates.shape)} do not fit layer {layer_idx} with {heads} heads; "
            "expected (..., num_layers, num_heads)"
        )
    gate = gates[..., layer_idx, :]
    if gate.dim() == 1:
        gate = gate.unsqueeze(0).expand(batch, heads)
    elif gate.shape[0] != batch:
        raise ValueError(f"head gates have batch {gate.shape[0]} but the model input has batch {batch}")
    return gate.to(dtype)


def gim_fused_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q ``(B, Hq, S, D)``, k/v ``(B, Hkv, S_kv, D)`` -> ``(B, S, Hq, D)``."""
    if _plain_sdpa_call(module):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            sliding_window=sliding_window, softcap=softcap, **kwargs,
        )
    if dropout:
        raise ValueError(
            f"gim_fused attention has no attention dropout (got p={dropout}): call model.eval() or set the "
            "config's attention dropout to 0"
        )
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"gim_fused attention does not support {unsupported!r} ({type(module).__name__})")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None:
        # The mask already encodes causality, the window and the cache alignment.
        mask = attention_mask[..., :kv_len]
        causal, window = False, None
    else:
        mask = None
        causal = bool(is_causal) and q_len > 1
        window = sliding_window
        if causal and kv_len > q_len:  # empty static cache at prefill, as the sdpa path does
            key, value = key[:, :, :q_len], value[:, :, :q_len]
    if torch.is_autocast_enabled(query.device.type):  # as sdpa under autocast: attention in the autocast dtype
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    gate = _layer_gate(module, query.shape[0], query.shape[1], query.dtype)
    skipped_rows = 0
    if q_len > 1 and q_len == key.shape[2] and id(module) in LAST_QUERY_ONLY.get():
        # Only the last query row's output is read (fastgim.pruning): bottom-right aligned causality
        # and window give that row exactly the keys it sees in the full problem.
        skipped_rows = q_len - 1
        query = query[:, :, -1:]
        if mask is not None and mask.dim() == 4 and mask.shape[-2] == q_len:
            mask = mask[..., -1:, :]
    out = attention(
        query, key, value, causal=causal, scale=scaling, attention_mask=mask, sliding_window=window,
        softcap=softcap, gate=gate,
    )
    out = out.transpose(1, 2)
    if skipped_rows:
        out = torch.cat([out.new_zeros(out.shape[0], skipped_rows, *out.shape[2:]), out], dim=1)
    return out.contiguous(), None


def gim_fused_mask(*args, **kwargs) -> torch.Tensor | None:
    """Mask builder: a 4D boolean mask, or None when plain causal / full attention suffices."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``"gim_fused"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, gim_fused_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, gim_fused_mask)


def supports_gim_fused(model: nn.Module) -> bool:
    """True if ``model`` is a transformers model whose attention routes through AttentionInterface."""
    return bool(getattr(type(model), "_supports_attention_backend", False)) and hasattr(model, "config")


def check_supported(model: nn.Module) -> None:
    """Raise a clear error if ``model`` cannot run ``gim_fused`` attention."""
    if supports_gim_fused(model):
        return
    name = type(model).__name__
    if not hasattr(model, "config"):
        raise TypeError(f"{name} is not a Hugging Face transformers model (no .config); fastgim needs one")
    raise TypeError(
        f"{name} does not route its attention through transformers' AttentionInterface, so GIM cannot be "
        f"applied to it exactly. Supported families: {', '.join(SUPPORTED_FAMILIES)}."
    )


def _current_implementation(model: nn.Module) -> str | dict | None:
    config = model.config
    sub_configs = getattr(config, "sub_configs", None) or {}
    implementations = {}
    for key in sub_configs:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            implementations[key] = sub._attn_implementation
    if implementations:
        implementations[""] = config._attn_implementation
        return implementations
    return config._attn_implementation


#: ``id`` of each config that fastgim switched from ``sdpa`` to ``gim_fused`` (while switched).
_SWITCHED_FROM_SDPA: set[int] = set()

_PLAIN_SDPA: contextvars.ContextVar[bool] = contextvars.ContextVar("fastgim_plain_sdpa", default=False)


@contextlib.contextmanager
def plain_sdpa() -> Iterator[None]:
    """In this block, ``gim_fused`` attention calls that neither GIM, gates nor pruning touch run transformers' sdpa.

    A model loaded with ``attn_implementation="gim_fused"`` then computes exactly what the same model
    loaded with the default ``sdpa`` computes (inteprelens' numerics), without changing the model:
    the choice is per call (a context variable), so other threads are not affected.
    """
    token = _PLAIN_SDPA.set(True)
    try:
        yield
    finally:
        _PLAIN_SDPA.reset(token)


def _switch_to_gim_fused(model: nn.Module) -> Callable[[], None]:
    """Set ``gim_fused`` attention; returns the undo (nothing to undo when the model is on it already)."""
    previous = _current_implementation(model)
    if previous == IMPLEMENTATION or (isinstance(previous, dict) and set(previous.values()) == {IMPLEMENTATION}):
        return lambda: None
    configs = {id(m.config) for m in model.modules() if getattr(m, "config", None) is not None}
    model.set_attn_implementation(IMPLEMENTATION)
    if previous == "sdpa":
        _SWITCHED_FROM_SDPA.update(configs)

    def undo() -> None:
        _SWITCHED_FROM_SDPA.difference_update(configs)
        model.set_attn_implementation(previous)

    return undo


def _plain_sdpa_call(module: nn.Module) -> bool:
    """True for a call that neither GIM, gates nor pruning touch, on a model fastgim switched from ``sdpa``
    (or inside :func:`plain_sdpa`).

    Such calls (plain inference in another thread while a GIM call runs) take the model's own ``sdpa``
    path, so their outputs are bit for bit what they would be without fastgim.
    """
    return (
        (_PLAIN_SDPA.get() or id(getattr(module, "config", None)) in _SWITCHED_FROM_SDPA)
        and current_settings() is None
        and _HEAD_GATES.get() is None
        and id(module) not in LAST_QUERY_ONLY.get()
    )


@contextlib.contextmanager
def use_gim_fused(model: nn.Module) -> Iterator[nn.Module]:
    """Switch ``model`` to ``gim_fused`` attention for the block; restore the previous one after.

    Concurrent and nested blocks (GIM, CHG, in any threads) share one switch: the first switches, the
    last to leave restores (:func:`fastgim.model_patches.shared_patch`), so no block sees the model
    switched back under it.
    """
    check_supported(model)
    with shared_patch(model, "gim_fused_attention", lambda: _switch_to_gim_fused(model)):
        yield model
