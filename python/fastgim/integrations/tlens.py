"""TransformerLens support: GIM on a ``HookedTransformer`` through its hook points.

:func:`gim_context` applies the GIM rules with forward hooks (plain PyTorch handles on
the hook points, removed on exit, exceptions included; the user's own TL hooks are
left alone):

* frozen norms: ``*.hook_scale`` returns the scale detached (LayerNorm keeps the mean's
  gradient, RMSNorm's rms is a constant);
* Q/K/V scales: ``attn.hook_q`` / ``hook_k`` / ``hook_v`` scale their gradient;
* gated-MLP scales: ``mlp.hook_pre`` (gate branch) and ``mlp.hook_pre_linear`` (up branch);
* softmax temperature in the attention softmax only: ``attn.hook_attn_scores`` keeps the
  scores S and ``attn.hook_pattern`` returns the pattern through an autograd function whose
  backward is ``dS = P_T * (dP - rowsum(dP * P_T))`` with ``P_T = softmax(S / T)``. No global
  ``torch.softmax`` patch, so a user's softmax-based metric keeps its ordinary gradient.

:func:`explain_tlens` is ``fastgim.explain`` for TL models (same arguments and semantics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fastgim.mlp_patching import scale_gradient
from fastgim.params import no_parameter_grads
from fastgim.settings import (
    DEFAULT_GATE_SCALE,
    DEFAULT_K_SCALE,
    DEFAULT_Q_SCALE,
    DEFAULT_TEMPERATURE,
    DEFAULT_UP_SCALE,
    DEFAULT_V_SCALE,
    GIMSettings,
)
from fastgim.tracing import target_positions

__all__ = ["is_tlens_model", "gim_context", "GIM", "explain_tlens", "infer_baseline_token_id"]


def is_tlens_model(model: Any) -> bool:
    """True for TransformerLens hooked models (anything with ``hook_dict`` and ``run_with_hooks``)."""
    return isinstance(getattr(model, "hook_dict", None), dict) and hasattr(model, "run_with_hooks")


class _TemperedSoftmaxGrad(torch.autograd.Function):
    """Forward: the attention pattern P (already ``softmax(S)``). Backward: GIM's softmax rule.

    The gradient goes to the scores S directly; P's own softmax node gets none, so the
    ordinary softmax backward never runs for this pattern.
    """

    @staticmethod
    def forward(ctx, pattern: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return pattern.detach().clone()

    @staticmethod
    def backward(ctx, grad_pattern: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (scores,) = ctx.saved_tensors
        compute = torch.promote_types(scores.dtype, torch.float32)
        p_t = torch.softmax(scores.to(compute) / ctx.temperature, dim=-1)
        p_t = torch.nan_to_num(p_t, nan=0.0)  # fully masked rows
        grad = grad_pattern.to(compute)
        grad_scores = p_t * (grad - (grad * p_t).sum(dim=-1, keepdim=True))
        return None, grad_scores.to(scores.dtype), None


def _hook_points(model: Any, suffix: str) -> list[tuple[str, nn.Module]]:
    return [(name, hp) for name, hp in model.hook_dict.items() if name.endswith(suffix)]


def _scale_hook(scale: float) -> Callable:
    return lambda _module, _inputs, output: scale_gradient(output, scale)


def _temperature_hooks(model: Any, temperature: float) -> list[Any]:
    scores_points = dict(_hook_points(model, "attn.hook_attn_scores"))
    pattern_points = _hook_points(model, "attn.hook_pattern")
    if not pattern_points:
        raise ValueError("softmax_temperature needs attn.hook_pattern hook points; this TL model has none")
    for block in getattr(model, "blocks", []):
        if getattr(getattr(block, "attn", None), "cfg", None) is not None and block.attn.cfg.use_attention_sinks:
            raise ValueError(
                "softmax_temperature on TL models with attention sinks is not supported; pass softmax_temperature=None"
            )
    handles = []
    for name, pattern_hp in pattern_points:
        scores_name = name[: -len("hook_pattern")] + "hook_attn_scores"
        if scores_name not in scores_points:
            raise ValueError(f"{name} has no matching {scores_name}; cannot apply the softmax temperature")
        stash: dict[str, torch.Tensor] = {}

        def keep_scores(_m, _i, output, stash=stash):
            stash["scores"] = output

        def temper(_m, _i, output, stash=stash, name=name):
            scores = stash.pop("scores", None)
            if scores is None:
                raise RuntimeError(f"{name} ran without its attention scores; cannot apply the softmax temperature")
            if not torch.is_grad_enabled() or not scores.requires_grad:
                return None
            return _TemperedSoftmaxGrad.apply(output, scores, temperature)

        handles.append(scores_points[scores_name].register_forward_hook(keep_scores))
        handles.append(pattern_hp.register_forward_hook(temper))
    return handles


@contextlib.contextmanager
def gim_context(model: Any, settings: GIMSettings | None = None) -> Iterator[Any]:
    """Apply GIM's backward rules to a TransformerLens model inside the block.

    Args:
        model: a ``HookedTransformer`` (or any TL model exposing the same hook names).
        settings: :class:`fastgim.GIMSettings`; None = the defaults. ``None`` fields turn a
            rule off (``gate_scale`` / ``up_scale`` act on gated MLPs only).

    Forward values are unchanged. Hooks are plain PyTorch handles, removed on exit.
    """
    if not is_tlens_model(model):
        raise TypeError(f"gim_context expects a TransformerLens HookedTransformer, got {type(model).__name__}")
    settings = GIMSettings() if settings is None else settings
    handles: list[Any] = []
    try:
        if settings.freeze_norm:
            for _name, hp in _hook_points(model, "hook_scale"):
                handles.append(hp.register_forward_hook(lambda _m, _i, out: out.detach()))
        for suffix, scale in (("attn.hook_q", settings.q_scale), ("attn.hook_k", settings.k_scale),
                              ("attn.hook_v", settings.v_scale), ("mlp.hook_pre", settings.gate_scale)):
            if scale is None:
                continue
            points = _hook_points(model, suffix)
            if suffix == "mlp.hook_pre":  # gate branch: only gated MLPs have hook_pre_linear
                gated = {n[: -len("hook_pre_linear")] for n, _ in _hook_points(model, "mlp.hook_pre_linear")}
                points = [(n, hp) for n, hp in points if n[: -len("hook_pre")] in gated]
            elif not points:
                raise ValueError(f"{suffix} hook points not found; cannot apply the {suffix[-1]} gradient scale")
            handles.extend(hp.register_forward_hook(_scale_hook(float(scale))) for _n, hp in points)
        if settings.up_scale is not None:
            handles.extend(hp.register_forward_hook(_scale_hook(float(settings.up_scale)))
                           for _n, hp in _hook_points(model, "mlp.hook_pre_linear"))
        if settings.softmax_temperature is not None and float(settings.softmax_temperature) != 1.0:
            handles.extend(_temperature_hooks(model, float(settings.softmax_temperature)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def infer_baseline_token_id(tokenizer: Any) -> int:
    """Baseline token: the tokenizer's space token, else pad, else unk (gim-explain's rule)."""
    try:
        ids = tokenizer.encode(" ", add_special_tokens=False)
        if ids:
            return int(ids[0])
    except Exception:  # noqa: BLE001 - tokenizers without encode / odd vocabularies fall through
        pass
    for attr in ("pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("cannot infer a baseline token from the tokenizer; pass baseline_token_id=")


def _targets(logits: torch.Tensor, target: Any, name: str) -> torch.Tensor:
    batch = logits.shape[0]
    if target is None:
        return logits.argmax(dim=-1)
    target = torch.as_tensor(target, device=logits.device, dtype=torch.long).reshape(-1)
    if target.numel() == 1:
        target = target.expand(batch)
    if target.numel() != batch:
        raise ValueError(f"{name} has {target.numel()} entries for a batch of {batch}; give one id or one per row")
    if (target < 0).any() or (target >= logits.shape[-1]).any():
        raise ValueError(f"{name} out of range for a vocabulary of {logits.shape[-1]}")
    return target


def explain_tlens(
    model: Any,
    input_ids: torch.Tensor,
    *,
    target_token_id: int | torch.Tensor | None = None,
    target_position: int = -1,
    baseline_token_id: int | None = None,
    tokenizer: Any = None,
    attention_mask: torch.Tensor | None = None,
    contrast_token_id: int | torch.Tensor | None = None,
    freeze_norm: bool = True,
    softmax_temperature: float | None = DEFAULT_TEMPERATURE,
    q_scale: float | None = DEFAULT_Q_SCALE,
    k_scale: float | None = DEFAULT_K_SCALE,
    v_scale: float | None = DEFAULT_V_SCALE,
    gate_scale: float | None = DEFAULT_GATE_SCALE,
    up_scale: float | None = DEFAULT_UP_SCALE,
) -> torch.Tensor:
    """GIM attribution of a TL model's prediction to its input tokens (``fastgim.explain`` for TL).

    Args:
        model: ``HookedTransformer``.
        input_ids: ``(seq,)`` or ``(batch, seq)`` int64 token ids.
        target_token_id: id (or one per row) to explain; None = argmax at the target position.
        target_position: position to explain, counted over each row's real (unpadded) tokens;
            -1 (default) = the last real token.
        baseline_token_id: baseline token; else inferred from ``tokenizer`` (or ``model.tokenizer``):
            space token, else pad, else unk.
        attention_mask: ``(batch, seq)`` 0/1 padding mask (passed to TL's forward).
        contrast_token_id: if given, explains ``logit[target] - logit[contrast]``.
        freeze_norm ... up_scale: the GIM rules (None turns one off), as in ``fastgim.GIM``.

    Returns:
        float32 ``(seq,)`` for 1-D or batch-1 input, else ``(batch, seq)``:
        ``sum_hidden grad * (embed(ids) - embed(baseline))`` at ``hook_embed``; padded positions are 0.
    """
    if not is_tlens_model(model):
        raise TypeError(f"explain_tlens expects a TransformerLens HookedTransformer, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise TypeError("input_ids must be an integer tensor of token ids, shape (seq,) or (batch, seq)")
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (seq,) or (batch, seq), got shape {tuple(input_ids.shape)}")
    if baseline_token_id is None:
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("pass baseline_token_id= or a tokenizer to infer it from")
        baseline_token_id = infer_baseline_token_id(tokenizer)
    settings = GIMSettings(freeze_norm, softmax_temperature, q_scale, k_scale, v_scale, gate_scale, up_scale)
    device = model.W_E.device if hasattr(model, "W_E") else ids.device
    ids = ids.to(device)
    mask = None if attention_mask is None else attention_mask.to(device).reshape(ids.shape).bool()
    with torch.no_grad():
        baseline = model.embed(torch.full_like(ids, int(baseline_token_id)))
    clean = model.embed(ids).detach().requires_grad_(True)
    kwargs = {} if mask is None else {"attention_mask": mask.long()}
    with no_parameter_grads(model), torch.enable_grad(), gim_context(model, settings):
        logits = model.run_with_hooks(ids, fwd_hooks=[("hook_embed", lambda _t, hook: clean)], **kwargs)
        rows = torch.arange(ids.shape[0], device=logits.device)
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        picked = logits[rows, target_positions(real, target_position)]
        target = _targets(picked.detach(), target_token_id, "target_token_id")
        objective = picked[rows, target]
        if contrast_token_id is not None:
            objective = objective - picked[rows, _targets(picked.detach(), contrast_token_id, "contrast_token_id")]
        (grad,) = torch.autograd.grad(objective.sum(), clean)
    scores = (grad.float() * (clean.detach().float() - baseline.float())).sum(dim=-1)
    if mask is not None:
        scores = scores.masked_fill(~mask, 0.0)
    return scores[0] if scores.shape[0] == 1 else scores


def GIM(  # noqa: N802 - the public name fastgim.GIM delegates to
    model: Any,
    *,
    freeze_norm: bool = True,
    softmax_temperature: float | None = DEFAULT_TEMPERATURE,
    q_scale: float | None = DEFAULT_Q_SCALE,
    k_scale: float | None = DEFAULT_K_SCALE,
    v_scale: float | None = DEFAULT_V_SCALE,
    gate_scale: float | None = DEFAULT_GATE_SCALE,
    up_scale: float | None = DEFAULT_UP_SCALE,
) -> contextlib.AbstractContextManager:
    """``fastgim.GIM`` for TL models: :func:`gim_context` with the settings given as keywords."""
    settings = GIMSettings(bool(freeze_norm), softmax_temperature, q_scale, k_scale, v_scale, gate_scale, up_scale)
    return gim_context(model, settings)
