"""Tracing and scoring (inteprelens' ``TransformerTracer``): named transformer sites and logits.

``TransformerTracer(model, tokenizer).trace(texts, layers=, sites=)`` runs one forward pass with
hooks and returns a :class:`TraceResult`; ``.score(texts, temperature=)`` returns
:class:`TokenScores`. The sites and their shapes are listed in :mod:`fastgim.sites`; the default
set is inteprelens' ``("block_output", "final_norm", "logits")``.

Padded batches work as in the model (pass texts with a tokenizer, or ``input_ids`` and
``attention_mask``); final-token selectors use the last non-padding position of each row,
for left and right padding alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastgim import validation
from fastgim.adapters import ModelAdapter, get_adapter
from fastgim.scoring import gather_token_scores, logits_to_log_probs, select_final_token
from fastgim.sites import DEFAULT_SITES, SITE_SPECS, canonical_site

__all__ = ["SITES", "TransformerTracer", "TraceResult", "TokenScores", "ScoreResult", "LayerSiteKey", "SiteRequest",
           "last_token_index", "target_positions", "position_ids_from_mask"]

SITES = tuple(SITE_SPECS)
"""Every site name fastgim traces (inteprelens' ten and ``logit_lens_input``)."""


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


@dataclasses.dataclass(frozen=True)
class LayerSiteKey:
    """A stable key for one capture: ``site`` and ``layer`` (None for global sites)."""

    site: str
    layer: int | None = None


@dataclasses.dataclass(frozen=True)
class SiteRequest:
    """A normalised trace request: ``site`` and the ``layers`` asked for (None = all)."""

    site: str
    layers: tuple[int, ...] | None = None


@dataclasses.dataclass
class TraceResult:
    """Activations captured by :meth:`TransformerTracer.trace` (inteprelens' ``TraceResult``).

    ``activations[site][layer]`` holds the tensors (layer ``None`` for global sites, see
    :mod:`fastgim.sites` for shapes); ``final_logits`` is the model's output ``(B, L, vocab)``;
    ``metadata`` has ``requested_layers`` and ``requested_sites``. fastgim also keeps
    ``input_ids``, ``attention_mask`` and ``num_heads`` (for ``final_token_logits`` and
    ``get(..., per_head=True)``).
    """

    activations: dict[str, dict[int | None, torch.Tensor]] = dataclasses.field(default_factory=dict)
    final_logits: torch.Tensor | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    num_heads: int | None = None

    def add(self, site: str, tensor: torch.Tensor, layer: int | None = None) -> None:
        """Store ``tensor`` as ``site`` at ``layer``."""
        self.activations.setdefault(canonical_site(site), {})[layer] = tensor

    def _key(self, site: str, layer: int | None) -> tuple[str, int | None]:
        try:
            site = canonical_site(site)
        except ValueError as exc:
            raise KeyError(str(exc)) from None
        stored = self.activations.get(site, {})
        if layer is not None and layer < 0 and layer not in stored:
            layers = self.metadata.get("num_layers")
            layer = layer + layers if layers else layer
        return site, layer

    def get(self, site: str, layer: int | None = None, *, per_head: bool = False) -> torch.Tensor:
        """The tensor traced at ``site`` for ``layer`` (None for global sites; negative counts from the end).

        ``per_head=True`` (``attn_o_proj_pre`` only) returns ``(B, L, Hq, head_dim)``.
        """
        site, layer = self._key(site, layer)
        stored = self.activations.get(site, {})
        if layer not in stored:
            where = "a global site: call get(site) without a layer" if not SITE_SPECS[site].layer_scoped and \
                layer is not None else f"traced layers {sorted(k for k in stored if k is not None)}"
            raise KeyError(f"No capture stored for site={site!r}, layer={layer!r} ({where}; traced sites "
                           f"{list(self.activations)})")
        value = stored[layer]
        if per_head:
            if site != "attn_o_proj_pre":
                raise ValueError("per_head=True applies to 'attn_o_proj_pre' only")
            value = value.unflatten(-1, (self.num_heads, -1))
        return value

    def has(self, site: str, layer: int | None = None) -> bool:
        """Whether ``site`` was captured at ``layer``."""
        try:
            site, layer = self._key(site, layer)
        except KeyError:
            return False
        return layer in self.activations.get(site, {})

    @property
    def available_sites(self) -> tuple[str, ...]:
        """Sites holding at least one capture, in capture order."""
        return tuple(self.activations)

    @property
    def layers(self) -> list[int]:
        """The traced layer indices (non-negative, sorted)."""
        return list(self.metadata.get("requested_layers", ()))

    @property
    def sites(self) -> list[str]:
        """The requested site names."""
        return list(self.metadata.get("requested_sites", ()))

    def _final(self) -> torch.Tensor:
        if self.final_logits is None:
            raise ValueError("This trace does not contain final logits.")
        return self.final_logits

    def final_log_probs(self) -> torch.Tensor:
        """``log_softmax`` of the model's final logits, ``(B, L, vocab)``."""
        return logits_to_log_probs(self._final())

    def final_probs(self) -> torch.Tensor:
        """Probabilities from the model's final logits, ``(B, L, vocab)``."""
        return self.final_log_probs().exp()

    def layer_log_probs(self, layer: int) -> torch.Tensor:
        """``log_softmax`` of the logit lens of ``layer``, ``(B, L, vocab)``."""
        return logits_to_log_probs(self.get("logits", layer))

    def layer_probs(self, layer: int) -> torch.Tensor:
        """Probabilities from the logit lens of ``layer``, ``(B, L, vocab)``."""
        return self.layer_log_probs(layer).exp()

    def final_token_logits(self) -> torch.Tensor:
        """Model logits at each row's last real token, ``(B, vocab)``."""
        return select_final_token(self._final(), self.attention_mask)


@dataclasses.dataclass
class TokenScores:
    """Final-model token scores (inteprelens' ``TokenScores``).

    ``logits (B, L, vocab)`` are the model's logits divided by ``temperature`` (as inteprelens
    stores them; ``logits * temperature`` gives the raw ones back); ``log_probs`` and ``probs`` are
    derived lazily as ``log_softmax(logits)`` and ``exp(log_probs)``, in the logits' dtype promoted
    to at least float32 (the same bits as inteprelens for float32 models).
    """

    logits: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    temperature: float = 1.0
    _log_probs: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)
    _probs: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.logits.ndim != 3:
            raise ValueError(f"logits must have shape (batch, seq, vocab), got {tuple(self.logits.shape)}")
        if self.input_ids.ndim != 2 or self.logits.shape[:2] != self.input_ids.shape:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} must be (batch, seq) matching the logits "
                             f"{tuple(self.logits.shape[:2])}")
        if self.attention_mask is not None and self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(f"attention_mask {tuple(self.attention_mask.shape)} must match input_ids "
                             f"{tuple(self.input_ids.shape)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

    @property
    def log_probs(self) -> torch.Tensor:
        """``log_softmax(logits)``, ``(B, L, vocab)``."""
        if self._log_probs is None:
            logits = self.logits.to(torch.promote_types(self.logits.dtype, torch.float32))
            self._log_probs = logits_to_log_probs(logits)
        return self._log_probs

    @property
    def probs(self) -> torch.Tensor:
        """``exp(log_probs)``, ``(B, L, vocab)``."""
        if self._probs is None:
            self._probs = self.log_probs.exp()
        return self._probs

    def final_token_logits(self) -> torch.Tensor:
        """Logits at each row's last real token, ``(B, vocab)``."""
        return select_final_token(self.logits, attention_mask=self.attention_mask)

    def final_token_log_probs(self) -> torch.Tensor:
        """Log-probabilities at each row's last real token, ``(B, vocab)``."""
        return select_final_token(self.log_probs, attention_mask=self.attention_mask)

    def final_token_probs(self) -> torch.Tensor:
        """Probabilities at each row's last real token, ``(B, vocab)``."""
        return select_final_token(self.probs, attention_mask=self.attention_mask)

    def gather_log_probs(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Log-probability of ``token_ids`` at each position: ``token_ids (B, L)`` -> ``(B, L)``."""
        return gather_token_scores(self.log_probs, token_ids)


ScoreResult = TokenScores
"""fastgim's earlier name of :class:`TokenScores`."""


def apply_final_norm(adapter: ModelAdapter, hidden_states: torch.Tensor) -> torch.Tensor:
    """The model's final norm applied to ``hidden_states (..., hidden)``."""
    return adapter.get_final_norm()(hidden_states)


def project_hidden_to_logits(adapter: ModelAdapter, hidden_states: torch.Tensor, *, apply_norm: bool = True
                             ) -> torch.Tensor:
    """Logit lens: the LM head of (the final norm of, with ``apply_norm``) ``hidden_states`` -> ``(..., vocab)``."""
    if apply_norm:
        hidden_states = apply_final_norm(adapter, hidden_states)
    return adapter.get_lm_head()(hidden_states)


def project_layer_logits(adapter: ModelAdapter, hidden_states_by_layer: dict[int, torch.Tensor], *,
                         source_site: str = "block_output") -> dict[int, torch.Tensor]:
    """:func:`project_hidden_to_logits` per layer; no norm when ``source_site`` is already normed."""
    apply_norm = source_site not in ("final_norm", "logit_lens_input")
    return {layer: project_hidden_to_logits(adapter, hidden, apply_norm=apply_norm)
            for layer, hidden in hidden_states_by_layer.items()}


def select_layers(hidden_states_by_layer: dict[int, torch.Tensor], layers: Iterable[int] | None = None
                  ) -> dict[int, torch.Tensor]:
    """A copy of ``hidden_states_by_layer`` restricted to ``layers`` (all when None)."""
    wanted = None if layers is None else set(layers)
    return {k: v for k, v in hidden_states_by_layer.items() if wanted is None or k in wanted}


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"could not find a tensor in a hook value of type {type(output).__name__}")


def _block_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return _first(args) if args else kwargs["hidden_states"]


class TransformerTracer:
    """Capture named transformer sites and score texts on a Hugging Face causal LM.

    Args:
        model: a causal LM with a layout :func:`fastgim.adapters.get_adapter` knows
            (any ``attn_implementation``, ``"gim_fused"`` included).
        tokenizer: needed when passing texts; ``input_ids`` tensors / encodings work without.
            inteprelens' ``TransformerTracer(model, adapter)`` also works: an adapter given as the
            second argument is taken as ``adapter``.
        adapter: a :class:`fastgim.adapters.ModelAdapter` (default ``get_adapter(model)``).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, adapter: ModelAdapter | None = None) -> None:
        if isinstance(tokenizer, ModelAdapter) and adapter is None:
            tokenizer, adapter = None, tokenizer
        self.model = model
        self.tokenizer = tokenizer
        self.adapter: ModelAdapter = adapter if adapter is not None else get_adapter(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs ----------------------------------------------------------------------------------
    def encode(self, texts: Any, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Turn texts / token ids / an encoding into ``(input_ids (B, L), attention_mask or None)``."""
        if isinstance(texts, str) or (isinstance(texts, Sequence) and texts and isinstance(texts[0], str)):
            ids, mask = self._tokenize([texts] if isinstance(texts, str) else list(texts))
            return ids, (mask if attention_mask is None else self._check_mask(attention_mask, ids))
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
        return ids.to(self.device), None if mask is None else self._check_mask(mask, ids)

    def _check_mask(self, mask: Any, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.as_tensor(mask)
        mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
        validation.attention_mask(mask, ids)
        return mask.to(self.device)

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

    def _inputs(self, texts: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (texts is None) == (input_ids is None):
            raise ValueError("give exactly one of texts= or input_ids=")
        return self.encode(texts if texts is not None else input_ids, attention_mask)

    # -- tracing ---------------------------------------------------------------------------------
    def _resolve(self, layers: Iterable[int] | int | None, sites: Iterable[str] | str | None
                 ) -> tuple[list[int], list[str]]:
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
        if sites is None:
            sites = list(DEFAULT_SITES)
        sites = [sites] if isinstance(sites, str) else list(sites)
        return sorted(set(resolved)), list(dict.fromkeys(canonical_site(s) for s in sites))

    def _site_hooks(self, layer: int, sites: list[str]) -> list[tuple[nn.Module, str, str]]:
        """``(module, "input" | "output", site)`` for the module-backed sites of ``layer``."""
        a = self.adapter
        block = a.get_layers()[layer]
        wanted = []
        if "block_input" in sites:
            wanted.append((block, "input", "block_input"))
        if {"block_output", "logits", "logit_lens_input"} & set(sites):
            wanted.append((block, "output", "block_output"))
        if "attn_o_proj_pre" in sites:
            wanted.append((a.get_attention_output_proj(block), "input", "attn_o_proj_pre"))
        if "attn_output" in sites:
            wanted.append((a.get_attention_module(block), "output", "attn_output"))
        if "post_attn_residual" in sites:
            wanted.append((a.post_attention_anchor(block), "input", "post_attn_residual"))
        if "mlp_input" in sites:
            wanted.append((a.get_mlp(block), "input", "mlp_input"))
        if "mlp_output" in sites:
            wanted.append((a.get_mlp(block), "output", "mlp_output"))
        return wanted

    @contextlib.contextmanager
    def _hooks(self, layers: list[int], sites: list[str], trace: TraceResult, keep: Any) -> Iterator[None]:
        wanted = [(module, where, site, layer) for layer in layers for module, where, site in self._site_hooks(layer, sites)]
        if "final_norm" in sites:
            wanted.append((self.adapter.get_final_norm(), "output", "final_norm", None))
        if "lm_head_input" in sites:
            wanted.append((self.adapter.get_lm_head(), "input", "lm_head_input", None))
        handles = []
        try:
            for module, where, site, layer in wanted:
                if where == "input":
                    handles.append(module.register_forward_pre_hook(
                        lambda _m, args, kwargs, s=site, i=layer: trace.add(s, keep(_block_input(args, kwargs)), i),
                        with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(
                        lambda _m, _a, out, s=site, i=layer: trace.add(s, keep(_first(out)), i)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def trace(
        self,
        texts: Any = None,
        layers: Iterable[int] | int | None = None,
        sites: Iterable[str] | str | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        detach: bool = True,
        clone: bool = True,
        **model_kwargs: Any,
    ) -> TraceResult:
        """Run one forward pass and capture ``sites`` at ``layers``.

        Args:
            texts: str, list of str (padded with the tokenizer), ``input_ids (B, L)`` or an encoding
                (or pass ``input_ids=`` as inteprelens does).
            layers: layer indices (negative count from the end); None = all layers.
            sites: names from :mod:`fastgim.sites`; None = ``("block_output", "final_norm", "logits")``.
            attention_mask: ``(B, L)`` 0/1 padding mask when passing ``input_ids``.
            detach / clone: store detached / cloned tensors (defaults as inteprelens); with
                ``detach=False`` the forward runs with autograd on.
            model_kwargs: passed to the model's forward.

        Returns:
            :class:`TraceResult` (tensors in the model dtype; ``logits`` in the LM head's dtype).
        """
        layers, sites = self._resolve(layers, sites)
        input_ids, mask = self._inputs(texts, input_ids, attention_mask)
        trace = TraceResult(metadata={"requested_layers": tuple(layers), "requested_sites": tuple(sites),
                                      "num_layers": self.adapter.num_layers},
                            input_ids=input_ids, attention_mask=mask, num_heads=self.adapter.num_heads)

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.detach() if detach else tensor
            return tensor.clone() if clone else tensor

        kwargs = {"use_cache": False, **position_ids_from_mask(mask), **model_kwargs}
        with torch.set_grad_enabled(not detach and torch.is_grad_enabled()):
            with self._hooks(layers, sites, trace, keep):
                out = self.model(input_ids=input_ids, attention_mask=mask, **kwargs)
            trace.final_logits = keep(_first(out.logits if hasattr(out, "logits") else out))
            self._project_layers(trace, layers, sites)
        return trace

    def _project_layers(self, trace: TraceResult, layers: list[int], sites: list[str]) -> None:
        """Add the synthetic per-layer sites (``logits``, ``logit_lens_input``) from ``block_output``."""
        if not {"logits", "logit_lens_input"} & set(sites):
            return
        blocks = trace.activations.get("block_output", {})
        for layer in layers:
            normed = apply_final_norm(self.adapter, blocks[layer])
            if "logit_lens_input" in sites:
                trace.add("logit_lens_input", normed, layer)
            if "logits" in sites:
                trace.add("logits", project_hidden_to_logits(self.adapter, normed, apply_norm=False), layer)
        if "block_output" not in sites:
            del trace.activations["block_output"]

    def score(
        self,
        texts: Any = None,
        temperature: float | None = 1.0,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> TokenScores:
        """Logits / temperature, log-probabilities and probabilities of every position for ``texts``.

        Args:
            texts: as in :meth:`trace` (or ``input_ids=``).
            temperature: divides the logits (must be > 0; None = 1).
            model_kwargs: passed to the model's forward.

        Returns:
            :class:`TokenScores` with ``logits (B, L, vocab)`` = model logits / temperature.
        """
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        input_ids, mask = self._inputs(texts, input_ids, attention_mask)
        kwargs = {"use_cache": False, **position_ids_from_mask(mask), **model_kwargs}
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask, **kwargs)
        if not hasattr(out, "logits"):
            raise ValueError(f"{type(self.model).__name__}'s output has no logits; use a causal LM")
        logits = out.logits.detach()
        scaled = logits / temperature if temperature not in (None, 1.0) else logits
        return TokenScores(scaled.clone(), input_ids.detach().clone(),
                           None if mask is None else mask.detach().clone(),
                           metadata={"model_class": type(self.model).__name__},
                           temperature=1.0 if temperature is None else float(temperature))
