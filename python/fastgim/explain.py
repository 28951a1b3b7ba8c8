"""``fastgim.explain``: GIM token attributions (gim-explain's API, plus batches, masks and contrast).

Attribution of token ``i`` = ``sum_h grad[i, h] * (emb[i, h] - baseline_emb[i, h])``, where ``emb``
is the output of ``model.get_input_embeddings()`` (Gemma scales inside that module), the model
runs on ``inputs_embeds`` inside :class:`fastgim.GIM`, and ``grad`` is the GIM gradient of the
target score (the target token's logit at the target position, minus the contrast token's logit
if given; for encoders, ``target(outputs)``) with respect to ``emb``. Only the embeddings get a
gradient: parameters' ``requires_grad`` is switched off during the call and restored after.

Work nothing reads is skipped: no KV cache, logits only at the target positions, and the last
transformer block computed only at those rows (:mod:`fastgim.pruning`).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fastgim import validation
from fastgim.checkpointing import checkpoint_layers
from fastgim.gim import GIM, is_hooked_transformer
from fastgim.loading import check_input_length
from fastgim.params import no_parameter_grads
from fastgim.pruning import target_rows_only
from fastgim.settings import (
    DEFAULT_GATE_SCALE,
    DEFAULT_K_SCALE,
    DEFAULT_Q_SCALE,
    DEFAULT_TEMPERATURE,
    DEFAULT_UP_SCALE,
    DEFAULT_V_SCALE,
)
from fastgim.tracing import position_ids_from_mask, target_positions

TokenIds = int | Sequence[int] | torch.Tensor | None


def resolve_baseline(baseline_token_id: int | None, tokenizer: Any, vocab: int) -> int:
    """The baseline token: explicit id, else the tokenizer's space token, else its pad, else its unk."""
    if baseline_token_id is not None:
        return validation.token_id(baseline_token_id, vocab, "baseline_token_id")
    if tokenizer is None:
        raise ValueError("explain needs a baseline: pass baseline_token_id=<id> or tokenizer=<the model's tokenizer>")
    candidates = []
    try:
        space = tokenizer.encode(" ", add_special_tokens=False)
    except (AttributeError, TypeError, ValueError):
        space = []
    if len(space) == 1:
        candidates.append(space[0])
    candidates += [getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "unk_token_id", None)]
    for candidate in candidates:
        if isinstance(candidate, int) and 0 <= candidate < vocab:
            return candidate
    raise ValueError(
        "the tokenizer has no single-token space, pad or unk token in the model's vocabulary; "
        "pass baseline_token_id explicitly"
    )


def _scores(
    outputs: Any, target: Callable | None, rows: torch.Tensor, positions: torch.Tensor,
    target_ids: torch.Tensor | None, contrast: torch.Tensor | None, vocab: int,
) -> torch.Tensor:
    """``[batch]`` target scores."""
    if target is not None:
        scores = torch.as_tensor(target(outputs))
        if scores.shape != (rows.shape[0],):
            raise ValueError(f"target(outputs) must return one score per row, shape ({rows.shape[0]},), "
                             f"got {tuple(scores.shape)}")
        return scores
    logits = _logits(outputs)
    if logits is None or logits.dim() != 3:
        raise TypeError(
            "the model's output has no [batch, seq, vocab] logits (an encoder such as BERT?); pass "
            "target=callable(outputs) -> [batch] scores instead of a target token"
        )
    picked = logits[rows, positions].float()  # [batch, vocab]
    ids = picked.argmax(-1) if target_ids is None else target_ids
    validation.check_vocabulary(ids, picked.shape[-1], "target_token_id")
    scores = picked[rows, ids]
    if contrast is not None:
        validation.check_vocabulary(contrast, picked.shape[-1], "contrast_token_id")
        scores = scores - picked[rows, contrast]
    return scores


def _logits(outputs: Any) -> torch.Tensor | None:
    """The logits of a model output: ``.logits``, the output itself, or the first element of a tuple."""
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, torch.Tensor):
        logits = outputs
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0]
    return logits


def input_embeddings(model: nn.Module, embeddings: nn.Module | None = None) -> nn.Embedding:
    """The token embedding module: ``embeddings`` if given, else ``model.get_input_embeddings()``."""
    if embeddings is None and hasattr(model, "get_input_embeddings"):
        embeddings = model.get_input_embeddings()
    if embeddings is None:
        found = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
        hint = f" (its nn.Embedding modules: {', '.join(found)})" if found else ""
        raise TypeError(
            f"{type(model).__name__} has no get_input_embeddings(); pass the token embedding module as "
            f"explain(..., embeddings=model.<token embedding>){hint}"
        )
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"the input embeddings must be an nn.Embedding, got {type(embeddings).__name__}")
    return embeddings


#: ``(ids, emb, calls)`` of the running :func:`explain` call in this thread / task (plain-module path).
_EMBEDDING_OUTPUT: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("fastgim_embedding_output",
                                                                                default=None)


def _replace_embedding_output(_module: nn.Module, args: tuple, _output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: the calling thread's ``emb`` for its ``ids`` (other threads' calls are left alone)."""
    current = _EMBEDDING_OUTPUT.get()
    if current is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    ids, emb, calls = current
    if args[0].shape != ids.shape or not torch.equal(args[0], ids):
        return None
    calls.append(True)
    return emb


@contextlib.contextmanager
def _embedding_output(embeddings: nn.Module, ids: torch.Tensor, emb: torch.Tensor):
    """While the model runs on ``ids``, ``embeddings(ids)`` returns ``emb`` (the tensor the gradient is taken at).

    The hook reads the calling thread's context, so concurrent calls on one model each get their own ``emb``.
    """
    calls: list[bool] = []
    token = _EMBEDDING_OUTPUT.set((ids, emb, calls))
    handle = embeddings.register_forward_hook(_replace_embedding_output)
    try:
        yield
    finally:
        handle.remove()
        _EMBEDDING_OUTPUT.reset(token)
    if not calls:
        raise TypeError(
            "the model never called its token embeddings on input_ids, so no gradient reaches them; pass the "
            "module it embeds the input ids with as embeddings="
        )


def _call_on_ids(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, kwargs: dict[str, Any]) -> Any:
    """Call a model without ``inputs_embeds`` (a plain ``nn.Module``) on the token ids."""
    if "attention_mask" in inspect.signature(model.forward).parameters:
        return model(ids, attention_mask=mask.long(), **kwargs)
    if not mask.all():
        raise ValueError(
            f"{type(model).__name__}.forward takes no attention_mask, so padded input cannot be explained; "
            "explain the rows one at a time without padding"
        )
    return model(ids, **kwargs)


def _forward_kwargs(
    mask: torch.Tensor, model: nn.Module, positions: torch.Tensor, token_target: bool
) -> tuple[dict[str, Any], torch.Tensor]:
    """Forward kwargs and where each row's target position lands in the returned logits.

    No KV cache (it would only cost memory); position ids that skip left padding; and, for
    token targets, logits only at the target positions (``logits_to_keep``): at long context
    the full ``[seq, vocab]`` logits and their gradient would dominate peak memory.
    """
    parameters = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"use_cache": False} if "use_cache" in parameters else {}
    if "position_ids" in parameters:
        kwargs.update(position_ids_from_mask(mask))
    if token_target and "logits_to_keep" in parameters:
        keep = torch.unique(positions)
        kwargs["logits_to_keep"] = keep
        positions = torch.searchsorted(keep, positions)
    return kwargs, positions


def explain(
    model: nn.Module,
    input_ids: Any,
    *,
    target_token_id: TokenIds = None,
    target_position: int = -1,
    baseline_token_id: int | None = None,
    tokenizer: Any = None,
    attention_mask: Any = None,
    contrast_token_id: TokenIds = None,
    freeze_norm: bool | None = True,
    softmax_temperature: float | None = DEFAULT_TEMPERATURE,
    q_scale: float | None = DEFAULT_Q_SCALE,
    k_scale: float | None = DEFAULT_K_SCALE,
    v_scale: float | None = DEFAULT_V_SCALE,
    gate_scale: float | None = DEFAULT_GATE_SCALE,
    up_scale: float | None = DEFAULT_UP_SCALE,
    target: Callable[[Any], torch.Tensor] | None = None,
    head_mask: torch.Tensor | None = None,
    checkpoint: bool = False,
    embeddings: nn.Module | None = None,
    softmax_scope: str | Callable[[torch.Tensor, int], bool] = "attention",
    integration: str = "auto",
) -> torch.Tensor:
    """GIM attribution of each input token to a target.

    Args:
        model: a Hugging Face model or any ``nn.Module`` (see :class:`fastgim.GIM` for what is served). A
            model whose forward has no ``inputs_embeds`` is called as ``model(input_ids[, attention_mask=])``
            with the token embedding module's output replaced by the embeddings the gradient is taken at.
        input_ids: ``[seq]`` or ``[batch, seq]`` integer token ids, or a text when ``tokenizer`` is given.
        target_token_id: token whose logit is explained: an int, or ``[batch]`` ids (one per row);
            default each row's argmax prediction at the target position.
        target_position: position of the logit, counted over each row's real (unpadded) tokens;
            -1 (default) is the last real token.
        baseline_token_id: counterfactual token; default the tokenizer's space token, else pad, else unk.
        tokenizer: tokenizes a text input and finds the default baseline token.
        attention_mask: ``[batch, seq]`` (or ``[seq]``) 1 / 0 padding mask; left or right padding.
        contrast_token_id: if given (int or ``[batch]``), the score is ``logit(target) - logit(contrast)``.
        freeze_norm, softmax_temperature, q_scale, k_scale, v_scale, gate_scale, up_scale: the GIM rules
            (``None`` turns one off), as in :class:`fastgim.GIM`.
        target: for encoders without an LM head: ``callable(model outputs) -> [batch]`` scores.
        head_mask: optional ``[num_layers, num_heads]`` or ``[batch, num_layers, num_heads]`` gates on the
            attention heads' outputs (via :func:`fastgim.integrations.hf.head_gates`).
        checkpoint: recompute each transformer block in the backward instead of keeping its
            activations (:func:`fastgim.checkpointing.checkpoint_layers`): one extra forward pass of
            time for a large cut in peak memory at long context.
        embeddings: the token embedding module (an ``nn.Embedding``); default ``model.get_input_embeddings()``,
            required for models without that method.
        softmax_scope, integration: as in :class:`fastgim.GIM`.

    Returns:
        float32 attributions, ``[seq]`` for 1-D or batch-1 input, else ``[batch, seq]``; padded positions are 0.

    Raises:
        TypeError / ValueError: for inputs :mod:`fastgim.validation` refuses (before any compute).
        FloatingPointError: when the attribution is not finite, naming the likely cause (NaN weights, fp16
            overflow, ...). The model is unchanged after any error; concurrent calls on one model are safe.
    """
    if is_hooked_transformer(model):
        return _explain_tlens(
            model, input_ids, target_token_id=target_token_id, target_position=target_position,
            baseline_token_id=baseline_token_id, tokenizer=tokenizer, attention_mask=attention_mask,
            contrast_token_id=contrast_token_id, freeze_norm=freeze_norm, softmax_temperature=softmax_temperature,
            q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
            target=target, head_mask=head_mask, checkpoint=checkpoint,
        )
    embeddings = input_embeddings(model, embeddings)
    vocab = embeddings.num_embeddings
    if isinstance(input_ids, str) and tokenizer is not None:
        encoded = tokenizer(input_ids, return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded.get("attention_mask", attention_mask)
    device = embeddings.weight.device
    ids = validation.token_ids(input_ids, vocab).to(device)
    check_input_length(model, ids.shape[-1])
    squeeze = ids.dim() == 1
    ids = ids[None] if ids.dim() == 1 else ids
    mask = validation.attention_mask(attention_mask, ids)
    batch = ids.shape[0]
    rows = torch.arange(batch, device=device)
    positions = target_positions(mask, target_position)
    target_ids = validation.row_token_ids(target_token_id, batch, vocab, "target_token_id", device)
    contrast = validation.row_token_ids(contrast_token_id, batch, vocab, "contrast_token_id", device)
    if target is not None and not callable(target):
        raise TypeError(f"target must be a callable(outputs) -> [batch] scores, got {type(target).__name__}")
    baseline = resolve_baseline(baseline_token_id, tokenizer, vocab)
    if model.training:
        warnings.warn(
            "explain() got a model in training mode (dropout active, attributions not deterministic); "
            "call model.eval() first", stacklevel=2,
        )
    gim = GIM(model, freeze_norm=freeze_norm, softmax_temperature=softmax_temperature, q_scale=q_scale,
              k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
              softmax_scope=softmax_scope, integration=integration)
    if head_mask is not None and not gim.uses_registry():
        raise ValueError(
            f"head_mask needs gim_fused attention, but {type(model).__name__} runs on the function-mode path "
            "(its attention is not in transformers' AttentionInterface)"
        )
    hf_style = "inputs_embeds" in inspect.signature(model.forward).parameters
    with torch.enable_grad(), no_parameter_grads(model), gim, _head_mask(head_mask), \
            checkpoint_layers(model, enabled=checkpoint):
        with torch.no_grad():
            base = embeddings(torch.full_like(ids, baseline))
        emb = embeddings(ids).detach().requires_grad_(True)
        kwargs, logit_positions = _forward_kwargs(mask, model, positions, target is None)
        with _last_block_rows(model, kwargs.get("logits_to_keep"), ids.shape[1]):  # checkpointing recomputes
            if hf_style:
                outputs = model(inputs_embeds=emb, attention_mask=mask.long(), **kwargs)
            else:
                with _embedding_output(embeddings, ids, emb):
                    outputs = _call_on_ids(model, ids, mask, kwargs)
            scores = _scores(outputs, target, rows, logit_positions, target_ids, contrast, vocab)
            (grad,) = torch.autograd.grad(scores.sum(), emb)
    attribution = (grad.float() * (emb.detach().float() - base.float())).sum(-1)
    attribution = validation.finite_result(attribution.masked_fill(~mask, 0.0), model, head_mask=head_mask)
    return attribution[0] if squeeze or batch == 1 else attribution


#: Run the last transformer block only at the kept target rows (:mod:`fastgim.pruning`).
PRUNE_LAST_BLOCK = True


def _last_block_rows(model: nn.Module, keep: torch.Tensor | None, seq_len: int) -> contextlib.AbstractContextManager:
    if keep is None or not PRUNE_LAST_BLOCK:
        return contextlib.nullcontext()
    return target_rows_only(model, keep, seq_len)


def _head_mask(head_mask: torch.Tensor | None) -> contextlib.AbstractContextManager:
    if head_mask is None:
        return contextlib.nullcontext()
    from fastgim.integrations.hf import head_gates

    return head_gates(head_mask)


def _explain_tlens(model: nn.Module, input_ids: Any, *, target: Callable | None, head_mask: torch.Tensor | None,
                   checkpoint: bool, **kwargs: Any) -> torch.Tensor:
    """``explain`` for TransformerLens models, by ``fastgim.integrations.tlens.explain_tlens``."""
    try:
        explain_tlens = importlib.import_module("fastgim.integrations.tlens").explain_tlens
    except ImportError as error:
        raise TypeError(
            "explain on a TransformerLens HookedTransformer needs fastgim.integrations.tlens, which is not available in this "
            "installation; use the Hugging Face model instead"
        ) from error
    if target is not None or head_mask is not None or checkpoint:
        raise ValueError(
            "target=, head_mask= and checkpoint= are not supported for TransformerLens models; use the HF model"
        )
    return explain_tlens(model, torch.as_tensor(input_ids), **kwargs)
