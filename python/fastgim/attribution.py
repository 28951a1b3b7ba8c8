"""``fastgim.attribute``: token attribution with GIM and the usual baselines, for any target.

Methods (``method=``):

* ``"gim"``: GIM gradient (all rules, :class:`fastgim.GIM`) times ``(embedding - baseline embedding)``,
  summed over the hidden dimension -- the same quantity as :func:`fastgim.explain`.
* ``"gim_freeze_norm"``, ``"gim_temperature"``, ``"gim_qkv_scale"``, ``"gim_mlp_scale"``: one GIM rule
  alone (the paper's ablations), the other rules off.
* ``"gradient_x_input"``: the plain gradient times ``(embedding - baseline embedding)``; the same
  formula as ``"gim"`` so that the backward pass is the only difference.
* ``"saliency"``: L2 norm over the hidden dimension of the plain gradient (non-negative).
* ``"integrated_gradients"``: path integral from the baseline embeddings (``n_steps`` midpoint
  Riemann steps, run through the model in chunks of ``internal_batch_size``); with
  ``gim_backward=True`` every step uses the GIM backward.
* ``"occlusion"``: target(input) - target(input with token i replaced by the baseline token),
  batched in chunks of ``internal_batch_size``.
* ``"random"``: uniform random scores in [-1, 1) (seeded; a control for evaluations).

Targets (``target=``, with ``contrast=``, ``objective=``, ``generate=``):

* ``None``: the model's own top prediction at ``target_position``;
* an ``int`` token id; its logit (``objective="logit"``) or log-probability (``"logprob"``);
  with ``contrast=`` (token id or one-token string) the difference against the contrast token;
* a ``str`` continuation: teacher-forced, the sum of its tokens' log-probabilities; the
  attribution has one row per continuation token (``Attribution.target_scores``);
* ``generate=True``: the model's own greedy continuation of ``max_new_tokens`` tokens, as a string;
* a callable ``target(outputs) -> Tensor[batch]``: any scalar of the outputs (encoders, similarity).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from fastgim import validation
from fastgim.explain import _last_block_rows  # the same last-block pruning as explain
from fastgim.loading import check_input_length
from fastgim.methods import GIM_RULE_METHODS, METHODS
from fastgim.params import eval_mode, no_parameter_grads
from fastgim.progress import progress_bar
from fastgim.results import Attribution
from fastgim.settings import (
    DEFAULT_GATE_SCALE,
    DEFAULT_K_SCALE,
    DEFAULT_Q_SCALE,
    DEFAULT_TEMPERATURE,
    DEFAULT_UP_SCALE,
    DEFAULT_V_SCALE,
)

__all__ = ["Attribution", "attribute", "METHODS", "GIM_RULE_METHODS", "PreparedInputs", "Target"]

_OBJECTIVES = ("logit", "logprob")


@dataclasses.dataclass
class PreparedInputs:
    """One sequence ready for the model: ``input_ids`` ``[1, seq]`` int64, its mask and extra kwargs."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    extra: dict[str, torch.Tensor]
    prompt_length: int

    def expand(self, n: int) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Mask and extra kwargs repeated for a batch of ``n`` variants of the sequence."""
        mask = None if self.attention_mask is None else self.attention_mask.expand(n, -1)
        return mask, {k: v.expand(n, *v.shape[1:]) for k, v in self.extra.items()}


@dataclasses.dataclass
class Target:
    """What is attributed: ``values(outputs) -> [batch, n_components]`` (their sum is the objective).

    ``positions[c]`` / ``token_ids[c]`` name the logit position and token of component ``c`` for
    language-model targets; both are empty for callable targets.
    """

    description: str
    positions: list[int]
    token_ids: list[int]
    objective: str = "logit"
    contrast_id: int | None = None
    fn: Callable[[Any], torch.Tensor] | None = None

    @property
    def n_components(self) -> int:
        return 1 if self.fn is not None else len(self.positions)

    def values(self, outputs: Any) -> torch.Tensor:
        """Target values ``[batch, n_components]`` float32 from the model outputs."""
        if self.fn is not None:
            value = self.fn(outputs)
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                raise ValueError(
                    "a callable target must return a 1-D tensor [batch], got "
                    f"{getattr(value, 'shape', type(value).__name__)}"
                )
            return value.float().unsqueeze(-1)
        logits = _logits(outputs)[:, self.positions].float()  # [batch, n, vocab]
        if self.objective == "logprob":
            logits = logits.log_softmax(-1)
        index = torch.tensor(self.token_ids, device=logits.device)
        picked = logits.gather(-1, index.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)
        if self.contrast_id is not None:
            picked = picked - logits[..., self.contrast_id]
        return picked


def attribute(
    model: nn.Module,
    inputs: Any,
    *,
    method: str = "gim",
    target: int | str | Callable[[Any], torch.Tensor] | None = None,
    tokenizer: Any = None,
    contrast: int | str | None = None,
    objective: str = "logit",
    target_position: int = -1,
    generate: bool = False,
    max_new_tokens: int = 8,
    attention_mask: torch.Tensor | None = None,
    baseline_token_id: int | None = None,
    n_steps: int = 32,
    internal_batch_size: int = 16,
    gim_backward: bool = False,
    seed: int = 0,
    freeze_norm: bool = True,
    softmax_temperature: float | None = DEFAULT_TEMPERATURE,
    q_scale: float | None = DEFAULT_Q_SCALE,
    k_scale: float | None = DEFAULT_K_SCALE,
    v_scale: float | None = DEFAULT_V_SCALE,
    gate_scale: float | None = DEFAULT_GATE_SCALE,
    up_scale: float | None = DEFAULT_UP_SCALE,
    progress: bool | None = None,
) -> Attribution:
    """Attribute a target to the input tokens of one sequence.

    Args:
        model: a Hugging Face model (causal LM for token / string targets; any model for callables).
        inputs: text (needs ``tokenizer``), chat messages ``[{"role", "content"}, ...]`` (through the
            tokenizer's chat template), token ids (list, ``[seq]`` or ``[1, seq]`` tensor) or a
            tokenizer output (dict / BatchEncoding).
        method: one of :data:`METHODS` (see the module docstring).
        target: ``None`` (top prediction), token id, continuation string, or ``callable(outputs) -> [batch]``.
        contrast: token id or one-token string; the target becomes target - contrast.
        objective: ``"logit"`` or ``"logprob"`` for token targets (continuations always use log-probs).
        target_position: position whose next-token logits are explained for token targets.
        generate, max_new_tokens: explain the model's own greedy continuation.
        attention_mask: ``[seq]`` or ``[1, seq]`` mask for token-id inputs.
        baseline_token_id: baseline token; default: the tokenizer's space token, else pad, else unk
            (else a zero embedding; occlusion then needs an explicit id).
        n_steps, internal_batch_size, gim_backward: integrated gradients / occlusion batching.
        seed: seed of ``"random"``.
        freeze_norm ... up_scale: GIM rules for ``"gim"`` (and ``gim_backward``); ``None`` turns one off.
        progress: a progress bar over the integrated-gradients steps / occlusion variants; ``None``
            (default): only when stderr is a terminal and the run lasts over a second
            (:mod:`fastgim.progress`); ``True`` / ``False`` force it on / off.

    Returns:
        :class:`Attribution` with float32 ``scores`` ``[seq]`` over the model input (prompt plus the
        teacher-forced continuation except its last token) and, for continuations, ``target_scores``
        ``[n_target, seq]``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be 'logit' or 'logprob', got {objective!r}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if internal_batch_size < 1:
        raise ValueError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
    gim_kwargs = dict(
        freeze_norm=freeze_norm, softmax_temperature=softmax_temperature, q_scale=q_scale, k_scale=k_scale,
        v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
    )
    device = _device(model)
    prepared = prepare_inputs(inputs, tokenizer, attention_mask=attention_mask, device=device,
                              vocab=validation.vocabulary_size(model))
    check_input_length(model, prepared.input_ids.shape[1])
    with _attribution_mode(model):
        if generate:
            target = _generate(model, prepared, tokenizer, max_new_tokens)
        with torch.no_grad():
            outputs = _forward(model, prepared.input_ids, prepared)
        extended, spec = build_target(
            model, prepared, target, tokenizer=tokenizer, contrast=contrast, objective=objective,
            target_position=target_position, outputs=outputs,
        )
        if extended is not prepared:  # a continuation: the outputs of the longer input are needed
            prepared = extended
            check_input_length(model, prepared.input_ids.shape[1])
            with torch.no_grad():
                outputs = _forward(model, prepared.input_ids, prepared)
        baseline_id = resolve_baseline(baseline_token_id, tokenizer, model)
        settings = _method_gim_settings(method, gim_backward, gim_kwargs)
        components = _run_method(
            method, model, prepared, spec, baseline_id, settings,
            n_steps=n_steps, internal_batch_size=internal_batch_size, seed=seed, progress=progress,
        )
        validation.finite_result(components[0], model, f"the {method} attribution")
    record = {"baseline_token_id": baseline_id, "objective": objective, "contrast": contrast}
    if method == "integrated_gradients":
        record.update(n_steps=n_steps, internal_batch_size=internal_batch_size, gim_backward=gim_backward)
    if method == "occlusion":
        record["internal_batch_size"] = internal_batch_size
    if method == "random":
        record["seed"] = seed
    if settings is not None:
        record["gim"] = dataclasses.asdict(settings)
    return _result(method, prepared, spec, outputs, components, tokenizer, record)


# ---------------------------------------------------------------------- inputs
def prepare_inputs(
    inputs: Any, tokenizer: Any = None, *, attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu", vocab: int | None = None,
) -> PreparedInputs:
    """Turn text / chat messages / token ids / a tokenizer output into :class:`PreparedInputs`.

    The ids and the mask are checked by :mod:`fastgim.validation` (ids in ``[0, vocab)`` when ``vocab`` is given).
    """
    extra: dict[str, torch.Tensor] = {}
    if isinstance(inputs, str):
        if not inputs.strip():
            raise ValueError("the input text is empty; pass a non-empty string")
        encoded = _tokenizer_required(tokenizer, "text inputs")(inputs, return_tensors="pt")
        return prepare_inputs(dict(encoded), device=device, vocab=vocab)
    if _is_chat(inputs):
        return prepare_inputs(_chat_text(inputs, tokenizer), tokenizer, device=device, vocab=vocab)
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        encoded = dict(inputs)
        if "input_ids" not in encoded:
            raise ValueError(f"tokenizer output without 'input_ids' (keys: {sorted(encoded)})")
        ids = encoded.pop("input_ids")
        attention_mask = encoded.pop("attention_mask", attention_mask)
        extra = {k: _as_row(v, k).to(device) for k, v in encoded.items() if k == "token_type_ids"}
    else:
        ids = inputs
    ids = _as_row(validation.token_ids(ids, vocab, "input ids"), "input ids").to(device)
    mask = None if attention_mask is None else _as_row(attention_mask, "attention_mask").to(device)
    if mask is not None:
        validation.attention_mask(mask, ids)
    return PreparedInputs(ids, mask, extra, ids.shape[1])


def _as_row(value: Any, name: str) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.shape[0] != 1:
        raise ValueError(
            f"{name} must be [seq] or [1, seq] (attribute explains one sequence; loop over a batch), "
            f"got shape {tuple(tensor.shape)}"
        )
    return tensor


def _is_chat(inputs: Any) -> bool:
    return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and all(isinstance(m, dict) for m in inputs)


def _chat_text(messages: Sequence[dict[str, str]], tokenizer: Any) -> str:
    tokenizer = _tokenizer_required(tokenizer, "chat messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass plain text or token ids instead of messages")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str) or not text:
        raise ValueError("the chat template rendered the messages to nothing")
    return text


def _tokenizer_required(tokenizer: Any, what: str) -> Any:
    return validation.require_tokenizer(tokenizer, what)


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------- targets
def build_target(
    model: nn.Module, prepared: PreparedInputs, target: Any, *, tokenizer: Any = None,
    contrast: int | str | None = None, objective: str = "logit", target_position: int = -1,
    outputs: Any = None,
) -> tuple[PreparedInputs, Target]:
    """Build the :class:`Target`; string targets extend the input by the teacher-forced continuation.

    ``outputs`` (the model's outputs on ``prepared``, optional) saves a forward pass.
    """
    length = prepared.input_ids.shape[1]
    if callable(target):
        if contrast is not None:
            raise ValueError("contrast= works with token targets, not with a callable target")
        name = getattr(target, "__name__", type(target).__name__)
        return prepared, Target(f"callable {name}", [], [], fn=target)
    if isinstance(target, str):
        if contrast is not None:
            raise ValueError("contrast= works with single-token targets; give target as a token id")
        return _continuation_target(prepared, target, tokenizer)
    position = validation.position(target_position, length) % length
    if outputs is None:
        with torch.no_grad():
            outputs = _forward(model, prepared.input_ids, prepared)
    logits = _logits(outputs)
    vocab = logits.shape[-1]
    if target is None:
        target = int(logits[0, position].argmax())
    if isinstance(target, torch.Tensor):
        target = int(target)
    if not isinstance(target, int) or not 0 <= target < vocab:
        raise ValueError(f"target must be a token id in [0, {vocab}), a string or a callable, got {target!r}")
    contrast_id = _contrast_id(contrast, tokenizer, vocab)
    text = _decode(tokenizer, [target])
    description = f"{objective} of {text!r} (id {target}) at position {position}"
    if contrast_id is not None:
        description += f" minus {_decode(tokenizer, [contrast_id])!r} (id {contrast_id})"
    return prepared, Target(description, [position], [target], objective, contrast_id)


def _continuation_target(prepared: PreparedInputs, text: str, tokenizer: Any) -> tuple[PreparedInputs, Target]:
    if not text:
        raise ValueError("the target string is empty; pass a non-empty continuation")
    ids = _encode_plain(_tokenizer_required(tokenizer, "string targets"), text)
    if not ids:
        raise ValueError(f"the target string {text!r} tokenizes to no tokens; pass a different continuation")
    length = prepared.input_ids.shape[1]
    cont = torch.tensor([ids[:-1]], dtype=torch.long, device=prepared.input_ids.device)
    extended = torch.cat([prepared.input_ids, cont], dim=1)
    mask = prepared.attention_mask
    if mask is not None:
        mask = torch.cat([mask, torch.ones_like(cont, dtype=mask.dtype)], dim=1)
    extra = {k: torch.cat([v, v[:, -1:].expand(1, cont.shape[1])], dim=1) for k, v in prepared.extra.items()}
    positions = list(range(length - 1, length - 1 + len(ids)))
    spec = Target(f"log-prob of continuation {text!r} ({len(ids)} tokens)", positions, ids, "logprob")
    return PreparedInputs(extended, mask, extra, length), spec


def _contrast_id(contrast: int | str | None, tokenizer: Any, vocab: int) -> int | None:
    if contrast is None:
        return None
    if isinstance(contrast, str):
        ids = _encode_plain(_tokenizer_required(tokenizer, "string contrasts"), contrast)
        if len(ids) != 1:
            raise ValueError(f"the contrast {contrast!r} must be exactly one token, it tokenizes to {len(ids)}")
        contrast = ids[0]
    if not isinstance(contrast, int) or not 0 <= contrast < vocab:
        raise ValueError(f"contrast must be a token id in [0, {vocab}) or a one-token string, got {contrast!r}")
    return contrast


def _generate(model: nn.Module, prepared: PreparedInputs, tokenizer: Any, max_new_tokens: int) -> str:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokenizer = _tokenizer_required(tokenizer, "generate=True")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = prepared.input_ids
    mask = prepared.attention_mask
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = _logits(model(input_ids=ids, attention_mask=mask))
            token = int(logits[0, -1].argmax())
            if token == eos and new:
                break
            new.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
    text = tokenizer.decode(new)
    if not _encode_plain(tokenizer, text):
        raise ValueError(f"the generated continuation {text!r} re-tokenizes to nothing; pass target= instead")
    return text


# ---------------------------------------------------------------------- model plumbing
def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _logits(outputs: Any) -> torch.Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and outputs[0].dim() == 3:
        logits = outputs[0]
    if logits is None:
        raise ValueError(
            "the model outputs have no logits (an encoder?); pass target=callable(outputs) -> Tensor[batch]"
        )
    return logits


def _forward(model: nn.Module, ids: torch.Tensor, prepared: PreparedInputs) -> Any:
    mask, extra = prepared.expand(ids.shape[0])
    return model(input_ids=ids, attention_mask=mask, **extra)


def _forward_embeds(model: nn.Module, embeds: torch.Tensor, prepared: PreparedInputs, **kwargs: Any) -> Any:
    mask, extra = prepared.expand(embeds.shape[0])
    return model(inputs_embeds=embeds, attention_mask=mask, **extra, **kwargs)


def embed(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings ``[batch, seq, hidden]`` as the model computes them (``get_input_embeddings()``)."""
    return model.get_input_embeddings()(ids)


@contextlib.contextmanager
def _attribution_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the block; both restored afterwards (by the last concurrent user)."""
    with eval_mode(model), no_parameter_grads(model):
        yield


def resolve_baseline(baseline_token_id: int | None, tokenizer: Any, model: nn.Module) -> int | None:
    """The baseline token: explicit id, else the tokenizer's space token, else pad, else unk, else None."""
    if baseline_token_id is not None:
        vocab = validation.vocabulary_size(model)
        return validation.token_id(baseline_token_id, vocab if vocab is not None else 2**63, "baseline_token_id")
    if tokenizer is not None:
        space = _encode_plain(tokenizer, " ")
        if len(space) == 1:
            return space[0]
        for name in ("pad_token_id", "unk_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                return int(value)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return None if pad is None else int(pad)


# ---------------------------------------------------------------------- methods
def _method_gim_settings(method: str, gim_backward: bool, gim_kwargs: dict[str, Any]) -> Any:
    from fastgim.settings import GIMSettings

    off = dataclasses.asdict(GIMSettings.off())
    if method == "gim" or (method == "integrated_gradients" and gim_backward):
        return GIMSettings(**gim_kwargs)
    rules = {
        "gim_freeze_norm": ("freeze_norm",),
        "gim_temperature": ("softmax_temperature",),
        "gim_qkv_scale": ("q_scale", "k_scale", "v_scale"),
        "gim_mlp_scale": ("gate_scale", "up_scale"),
    }.get(method)
    if rules is None:
        return None
    defaults = dataclasses.asdict(GIMSettings())
    return GIMSettings(**{**off, **{k: gim_kwargs[k] if gim_kwargs[k] is not None else defaults[k] for k in rules}})


@contextlib.contextmanager
def _gim_context(model: nn.Module, settings: Any) -> Iterator[None]:
    if settings is None:
        yield
        return
    from fastgim.gim import GIM

    with GIM(model, **dataclasses.asdict(settings)):
        yield


def component_gradients(
    model: nn.Module, embeds: torch.Tensor, prepared: PreparedInputs, spec: Target, settings: Any = None,
) -> torch.Tensor:
    """Gradients ``[n_components, batch, seq, hidden]`` of each target component w.r.t. ``embeds``.

    ``embeds`` is ``[batch, seq, hidden]``; each batch row is an independent variant of the sequence.
    ``settings`` (a :class:`fastgim.GIMSettings`) runs the forward and backward inside ``fastgim.GIM``.
    """
    embeds = embeds.detach().requires_grad_(True)
    keep, spec = _kept_rows(model, spec, embeds.device)
    with _gim_context(model, settings), _last_block_rows(model, keep, embeds.shape[1]):
        kwargs = {} if keep is None else {"logits_to_keep": keep}
        values = spec.values(_forward_embeds(model, embeds, prepared, **kwargs))
        grads = []
        for c in range(values.shape[1]):
            (grad,) = torch.autograd.grad(values[:, c].sum(), embeds, retain_graph=c < values.shape[1] - 1)
            grads.append(grad)
    return torch.stack(grads)


def _kept_rows(model: nn.Module, spec: Target, device: torch.device) -> tuple[torch.Tensor | None, Target]:
    """For token targets of a causal LM: the distinct target rows (``logits_to_keep``) and the target re-indexed
    into the kept logits. The last block then runs at those rows only, exactly as in :func:`fastgim.explain`, so
    ``method="gim"`` gives explain's numbers bit for bit (and skips the unused rows' work)."""
    if spec.fn is not None or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None, spec
    keep = sorted(set(spec.positions))
    kept = dataclasses.replace(spec, positions=[keep.index(p) for p in spec.positions])
    return torch.tensor(keep, dtype=torch.long, device=device), kept


def _run_method(
    method: str, model: nn.Module, prepared: PreparedInputs, spec: Target, baseline_id: int | None,
    settings: Any, *, n_steps: int, internal_batch_size: int, seed: int, progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (total scores ``[seq]``, per-component scores ``[n_components, seq]``), float32."""
    ids = prepared.input_ids
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        per = torch.rand(spec.n_components, ids.shape[1], generator=gen) * 2 - 1
        return per.sum(0), per
    if method == "occlusion":
        per = _occlusion(model, prepared, spec, _need_baseline(baseline_id, method), internal_batch_size, progress)
        return per.sum(0), per
    emb = embed(model, ids).detach()
    base = _baseline_embeds(model, ids, baseline_id, emb)
    if method == "integrated_gradients":
        grads = _integrated_grads(model, emb, base, prepared, spec, settings, n_steps, internal_batch_size,
                                  progress)
    else:
        grads = component_gradients(model, emb, prepared, spec, settings)[:, 0]  # [n, seq, hidden]
    if method == "saliency":
        per = grads.float().norm(dim=-1)
        return grads.float().sum(0).norm(dim=-1), per
    per = (grads.float() * (emb - base).float()).sum(-1)
    return per.sum(0), per


def _need_baseline(baseline_id: int | None, method: str) -> int:
    if baseline_id is None:
        raise ValueError(f"{method} needs a baseline token: pass baseline_token_id=... or a tokenizer")
    return baseline_id


def _baseline_embeds(model: nn.Module, ids: torch.Tensor, baseline_id: int | None, emb: torch.Tensor) -> torch.Tensor:
    if baseline_id is None:
        return torch.zeros_like(emb)
    return embed(model, torch.full_like(ids, baseline_id)).detach()


def _integrated_grads(
    model: nn.Module, emb: torch.Tensor, base: torch.Tensor, prepared: PreparedInputs, spec: Target,
    settings: Any, n_steps: int, chunk: int, progress: bool | None = None,
) -> torch.Tensor:
    """Mean gradient along the straight path (midpoint rule): ``[n_components, seq, hidden]`` float32."""
    alphas = (torch.arange(n_steps, dtype=torch.float32) + 0.5) / n_steps
    total = None
    with progress_bar(total=n_steps, desc="integrated gradients steps", enabled=progress) as bar:
        for start in range(0, n_steps, chunk):
            a = alphas[start : start + chunk].to(emb.device).view(-1, 1, 1)
            path = (base.float() + a * (emb - base).float()).to(emb.dtype)
            grads = component_gradients(model, path, prepared, spec, settings).float().sum(1)
            total = grads if total is None else total + grads
            bar.update(a.shape[0])
    return total / n_steps


def target_values(model: nn.Module, ids: torch.Tensor, prepared: PreparedInputs, spec: Target) -> torch.Tensor:
    """Target components ``[batch, n_components]`` float32 for a batch of id variants ``[batch, seq]``."""
    with torch.no_grad():
        return spec.values(_forward(model, ids, prepared))


def batched_target_values(
    model: nn.Module, variants: torch.Tensor, prepared: PreparedInputs, spec: Target, chunk: int,
    progress: bool | None = False,
) -> torch.Tensor:
    """:func:`target_values` over ``variants`` ``[n, seq]`` in chunks of ``chunk`` rows."""
    values = []
    with progress_bar(total=variants.shape[0], desc="occluded inputs", enabled=progress) as bar:
        for part in variants.split(chunk):
            values.append(target_values(model, part, prepared, spec))
            bar.update(part.shape[0])
    return torch.cat(values)


def _occlusion(
    model: nn.Module, prepared: PreparedInputs, spec: Target, baseline_id: int, chunk: int,
    progress: bool | None = None,
) -> torch.Tensor:
    ids = prepared.input_ids
    n = ids.shape[1]
    full = target_values(model, ids, prepared, spec)  # [1, n_comp]
    variants = ids.repeat(n, 1)
    variants[torch.arange(n), torch.arange(n)] = baseline_id
    occluded = batched_target_values(model, variants, prepared, spec, chunk, progress)  # [n, n_comp]
    return (full - occluded).T.float().cpu()


# ---------------------------------------------------------------------- result
def _result(
    method: str, prepared: PreparedInputs, spec: Target, outputs: Any, components: tuple[torch.Tensor, torch.Tensor],
    tokenizer: Any, record: dict[str, Any],
) -> Attribution:
    total, per = (c.detach().float().cpu() for c in components)
    ids = prepared.input_ids[0].tolist()
    with torch.no_grad():
        value = float(spec.values(outputs).sum())
    prediction = None
    if spec.fn is None:
        top = _logits(outputs)[0, spec.positions].argmax(-1).tolist()
        prediction = _decode(tokenizer, top)
    multi = spec.fn is None and len(spec.positions) > 1
    return Attribution(
        tokens=_token_names(tokenizer, ids),
        pieces=token_pieces(tokenizer, ids),
        token_ids=ids,
        scores=total.contiguous(),
        method=method,
        target=spec.description,
        prediction=prediction,
        target_value=value,
        target_tokens=[_decode(tokenizer, [t]) for t in spec.token_ids] if multi else [],
        target_scores=per.contiguous() if multi else None,
        settings=record,
        prompt_length=prepared.prompt_length,
    )


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        return " ".join(f"<{i}>" for i in ids)
    return tokenizer.decode(ids)


def _token_names(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def token_pieces(tokenizer: Any, ids: list[int], window: int = 4) -> list[str]:
    """The text each token adds to the decoded string (leading spaces kept), decoding small windows."""
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    pieces = []
    for i in range(len(ids)):
        start = max(0, i - window)
        before = tokenizer.decode(ids[start:i]) if i > start else ""
        after = tokenizer.decode(ids[start : i + 1])
        pieces.append(after[len(before) :] if after.startswith(before) and after != before else tokenizer.decode([ids[i]]))
    return pieces
