"""Tracing and scoring (inteprelens' ``TransformerTracer``): named transformer sites and logits.

``TransformerTracer(model, tokenizer).trace(texts, layers=, sites=)`` runs one
forward pass with hooks and returns a :class:`TraceResult`; ``.score(texts,
temperature=)`` returns a :class:`ScoreResult`. Sites, per layer ``l``:

* ``attn_o_proj_pre``: input of the attention output projection, ``(B, L, Hq * head_dim)``
  (the per-head outputs, concatenated; ``.get(..., per_head=True)`` gives ``(B, L, Hq, D)``);
* ``attn_out``: attention module output (before the residual add), ``(B, L, hidden)``;
* ``mlp_out``: MLP (or MoE block) output, ``(B, L, hidden)``;
* ``block_out``: decoder layer output (the residual stream after layer ``l``), ``(B, L, hidden)``;
* ``final_norm``: the model's final norm applied to ``block_out`` of layer ``l`` (for the
  last layer this is exactly the model's final normed state), ``(B, L, hidden)``;
* ``logits``: logit lens, the LM head applied to ``final_norm`` of layer ``l``, ``(B, L, vocab)``.

Padded batches work as in the model (pass texts with a tokenizer, or ``input_ids`` and
``attention_mask``); final-token selectors use the last non-padding position of each row,
for left and right padding alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastgim import validation
from fastgim.adapters import ModelAdapter, get_adapter

__all__ = ["SITES", "TransformerTracer", "TraceResult", "ScoreResult", "last_token_index", "target_positions",
           "position_ids_from_mask"]

SITES = ("attn_o_proj_pre", "attn_out", "mlp_out", "block_out", "final_norm", "logits")


def last_token_index(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Index of the last non-padding token of each row, ``(B,)`` int64 (``length - 1`` without a mask)."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    mask = attention_mask.to(device).bool()
    if not mask.any(dim=-1).all():
        raise ValueError("attention_mask has a row with no real token; every row needs at least one")
    positions = torch.arange(length, device=device).expand(batch, length)
    return torch.where(mask, positions, -1).max(dim=-1).values


def target_positions(mask: torch.Tensor, target_position: int = -1) -> torch.Tensor:
    """Index ``(B,)`` of ``target_position`` counted over each row's real tokens of ``mask (B, L)`` bool.

    -1 is each row's last real token; works for left and right padding.
    """
    lengths = mask.sum(-1)
    shortest = int(lengths.min())
    target_position = validation.position(target_position, shortest, unit="real tokens")
    wanted = lengths + target_position if target_position < 0 else torch.full_like(lengths, target_position)
    order = torch.cumsum(mask.long(), -1) - 1
    return (mask & (order == wanted[:, None])).float().argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"position_ids": (B, L)}`` counting real tokens only (left padding safe), or ``{}`` without padding."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return {}
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}


def _gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values[torch.arange(values.shape[0], device=values.device), index.to(values.device)]


@dataclasses.dataclass
class TraceResult:
    """Activations captured by :meth:`TransformerTracer.trace`.

    ``activations[(site, layer)]`` holds detached tensors (see the module docstring for
    shapes); ``final_logits`` is the model's output ``(B, L, vocab)``.
    """

    activations: dict[tuple[str, int], torch.Tensor]
    final_logits: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    layers: list[int]
    sites: list[str]
    num_heads: int

    def get(self, site: str, layer: int, *, per_head: bool = False) -> torch.Tensor:
        """The tensor traced at ``site`` for ``layer`` (negative layers count from the end)."""
        if site not in SITES:
            raise KeyError(f"unknown site {site!r}; sites are {', '.join(SITES)}")
        key = (site, layer)
        if key not in self.activations and layer < 0:
            key = (site, max(self.layers) + 1 + layer) if self.layers else key
        if key not in self.activations:
            raise KeyError(
                f"({site!r}, layer {layer}) was not traced; traced sites {self.sites} at layers {self.layers}"
            )
        value = self.activations[key]
        if per_head:
            if site != "attn_o_proj_pre":
                raise ValueError("per_head=True applies to 'attn_o_proj_pre' only")
            value = value.unflatten(-1, (self.num_heads, -1))
        return value

    def final_token_logits(self) -> torch.Tensor:
        """Model logits at each row's last real token, ``(B, vocab)``."""
        b, n = self.final_logits.shape[:2]
        return _gather_rows(self.final_logits, last_token_index(self.attention_mask, b, n, self.final_logits.device))


@dataclasses.dataclass
class ScoreResult:
    """Output of :meth:`TransformerTracer.score`.

    ``logits`` are the model's raw logits ``(B, L, vocab)``; ``log_probs`` and ``probs``
    are ``log_softmax`` / ``softmax`` of ``logits / temperature`` in float32.
    """

    logits: torch.Tensor
    log_probs: torch.Tensor
    probs: torch.Tensor
    attention_mask: torch.Tensor | None
    temperature: float

    def _final(self, values: torch.Tensor) -> torch.Tensor:
        b, n = values.shape[:2]
        return _gather_rows(values, last_token_index(self.attention_mask, b, n, values.device))

    def final_token_logits(self) -> torch.Tensor:
        """Logits at each row's last real token, ``(B, vocab)``."""
        return self._final(self.logits)

    def final_token_log_probs(self) -> torch.Tensor:
        """Log-probabilities at each row's last real token, ``(B, vocab)`` float32."""
        return self._final(self.log_probs)

    def final_token_probs(self) -> torch.Tensor:
        """Probabilities at each row's last real token, ``(B, vocab)`` float32."""
        return self._final(self.probs)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class TransformerTracer:
    """Capture named transformer sites and score texts on a Hugging Face causal LM.

    Args:
        model: a causal LM with a layout :func:`fastgim.adapters.get_adapter` knows
            (any ``attn_implementation``, ``"gim_fused"`` included).
        tokenizer: needed when passing texts; ``input_ids`` tensors / encodings work without.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapter: ModelAdapter = get_adapter(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs ----------------------------------------------------------------------------------
    def encode(self, texts: Any, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Turn texts / token ids / an encoding into ``(input_ids (B, L), attention_mask or None)``."""
        if isinstance(texts, str) or (isinstance(texts, Sequence) and texts and isinstance(texts[0], str)):
            return self._tokenize([texts] if isinstance(texts, str) else list(texts))
        if isinstance(texts, Mapping):
            ids, mask = texts["input_ids"], texts.get("attention_mask", attention_mask)
        elif isinstance(texts, torch.Tensor):
            ids, mask = texts, attention_mask
        else:
            raise TypeError(
                f"texts must be a str, a list of str, a tensor of token ids or an encoding, got {type(texts).__name__}"
            )
        ids = validation.token_ids(ids, validation.vocabulary_size(self.model))
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if mask is not None:
            mask = torch.as_tensor(mask)
            mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
            validation.attention_mask(mask, ids)
            mask = mask.to(self.device)
        return ids.to(self.device), mask

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        if tok is None:
            raise ValueError("texts given but the tracer has no tokenizer: pass tokenizer= or token ids")
        restore = tok.pad_token is None and getattr(tok, "eos_token", None) is not None
        if tok.pad_token is None and not restore:
            raise ValueError("the tokenizer has no pad or eos token; set tokenizer.pad_token to batch texts")
        if restore:
            tok.pad_token = tok.eos_token
        try:
            enc = tok(texts, return_tensors="pt", padding=True)
        finally:
            if restore:
                tok.pad_token = None
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # -- tracing ---------------------------------------------------------------------------------
    def _resolve(self, layers: Sequence[int] | int | None, sites: Sequence[str] | str | None) -> tuple[list[int], list[str]]:
        n = self.adapter.num_layers
        if layers is None:
            layers = range(n)
        elif isinstance(layers, int):
            layers = [layers]
        resolved = []
        for layer in layers:
            if not -n <= layer < n:
                raise IndexError(f"layer {layer} out of range for a model with {n} layers")
            resolved.append(layer % n)
        sites = list(SITES) if sites is None else ([sites] if isinstance(sites, str) else list(sites))
        unknown = [s for s in sites if s not in SITES]
        if unknown:
            raise ValueError(f"unknown site(s) {unknown}; sites are {', '.join(SITES)}")
        return sorted(set(resolved)), sites

    @contextlib.contextmanager
    def _hooks(self, layers: list[int], sites: list[str], store: dict) -> Iterator[None]:
        handles = []
        need_block = any(s in sites for s in ("block_out", "final_norm", "logits"))

        def save(key: tuple[str, int], value: torch.Tensor) -> None:
            store[key] = value.detach()

        try:
            for layer in layers:
                if "attn_o_proj_pre" in sites:
                    handles.append(self.adapter.get_o_proj(layer).register_forward_pre_hook(
                        lambda _m, args, key=("attn_o_proj_pre", layer): save(key, args[0])))
                if "attn_out" in sites:
                    handles.append(self.adapter.get_attention_module(layer).register_forward_hook(
                        lambda _m, _a, out, key=("attn_out", layer): save(key, _first(out))))
                if "mlp_out" in sites:
                    handles.append(self.adapter.get_mlp(layer).register_forward_hook(
                        lambda _m, _a, out, key=("mlp_out", layer): save(key, _first(out))))
                if need_block:
                    handles.append(self.adapter.get_layers()[layer].register_forward_hook(
                        lambda _m, _a, out, key=("block_out", layer): save(key, _first(out))))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def trace(
        self,
        texts: Any,
        layers: Sequence[int] | int | None = None,
        sites: Sequence[str] | str | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> TraceResult:
        """Run one forward pass and capture ``sites`` at ``layers`` (defaults: all of both).

        Args:
            texts: str, list of str (padded with the tokenizer), ``input_ids (B, L)`` or an encoding.
            layers: layer indices (negative count from the end); None = all layers.
            sites: names from :data:`SITES`; None = all.
            attention_mask: ``(B, L)`` 0/1 padding mask when passing ``input_ids``.

        Returns:
            :class:`TraceResult` (detached tensors, model dtype; ``logits`` in the LM head's dtype).
        """
        layers, sites = self._resolve(layers, sites)
        input_ids, mask = self.encode(texts, attention_mask)
        store: dict[tuple[str, int], torch.Tensor] = {}
        with torch.no_grad(), self._hooks(layers, sites, store):
            out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False,
                             **position_ids_from_mask(mask))
            final_logits = _first(out.logits if hasattr(out, "logits") else out).detach()
            for layer in layers:
                block = store.get(("block_out", layer))
                if block is None:
                    continue
                if "final_norm" in sites or "logits" in sites:
                    normed = self.adapter.get_final_norm()(block)
                    if "final_norm" in sites:
                        store[("final_norm", layer)] = normed
                    if "logits" in sites:
                        store[("logits", layer)] = self.adapter.get_lm_head()(normed)
                if "block_out" not in sites:
                    del store[("block_out", layer)]
        return TraceResult(store, final_logits, input_ids, mask, layers, sites, self.adapter.num_heads)

    def score(self, texts: Any, temperature: float = 1.0, *, attention_mask: torch.Tensor | None = None) -> ScoreResult:
        """Logits, log-probabilities and probabilities of every position for ``texts``.

        Args:
            texts: as in :meth:`trace`.
            temperature: divides the logits before ``log_softmax`` / ``softmax`` (must be > 0).

        Returns:
            :class:`ScoreResult` with ``logits (B, L, vocab)`` (raw, model dtype) and float32
            ``log_probs`` / ``probs``.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        input_ids, mask = self.encode(texts, attention_mask)
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, **position_ids_from_mask(mask))
        logits = (out.logits if hasattr(out, "logits") else _first(out)).detach()
        scaled = logits.float() / temperature
        return ScoreResult(logits, torch.log_softmax(scaled, -1), torch.softmax(scaled, -1), mask, float(temperature))
