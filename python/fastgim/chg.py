"""Causal Head Gating (CHG, Nam et al. 2025, arXiv 2505.13737) on the fused attention op.

Each attention head ``(layer, head)`` gets a gate ``g = sigmoid(logit)`` that multiplies its
output before the output projection. The gates reach the attention op's ``gate`` argument
through :func:`fastgim.integrations.hf.head_gates` (fused in the kernel on GPU, the ``torch`` backend on
CPU); no forward hooks are involved. ``CHG(gate="hook")`` gates the same head outputs inteprelens'
way instead, by pre-hooks on the attention output projections (:mod:`fastgim.o_proj_gates`): the
default for models whose attention cannot take the fused gate (with an adapter), and the path of
``CHGTrainer(numerics="inteprelens")``. Several masks are evaluated in one pass by repeating the
batch once per mask.

Training minimises, for each mask independently::

    loss = NLL(targets | gated model) - lambda * mean(clamp(logits, -c, c))

with Adam on the logits. The default reductions are those of the reference CHG code (and
inteprelens): the NLL is the mean over prompts of each prompt's mean target-token NLL, and the
penalty is the mean over the ``(L, H)`` logits, so the pressure per head does not grow with the
model. The paper writes sums (``-sum_D log P(y|x) - lambda * sum_{l,h} clamp(logit)``); with a mean
NLL, ``l1_reduction="sum"`` is exactly the default with ``lambda`` multiplied by ``L * H``, and
``nll_reduction="sum"`` with ``l1_reduction="sum"`` is the paper's formula on each batch. Both are
available, but neither is the default: on the shipped 16-head model (``benchmarks/chg_penalty.py``,
``benchmarks/results/chg_penalty.json``), the literal sum penalty with lambda 0.1 switches every
needed head off, and the paper's summed form leaves the jointly needed layer-0 heads at gates near
0.25, below the 0.5 threshold, so its "facilitating" heads do not carry the task in 7 of 8 seeds,
while the default's do in 7 of 8. Three stages:

* ``"none"`` (lambda = 0) from gates drawn uniform(0, 1);
* ``"retention"`` (lambda = +l1_weight: the penalty pushes gates to 1), started from the
  result of the first stage;
* ``"removal"`` (lambda = -l1_weight: pushes gates to 0), also started from the first stage.

The public nam_causal-head-gating code (and inteprelens, which copies it) calls the lambda > 0
stage "positive" and documents it as pushing gates to 0, although its loss pushes them to 1;
here the stage names say what the pressure does. ``"positive"`` / ``"negative"`` are accepted
as aliases by the sign of lambda (retention / removal).

Taxonomy from the final retention mask ``s`` and removal mask ``r`` (threshold ``t``):

* facilitating: ``r >= t`` (stays on even under removal pressure);
* interfering: ``s < t`` (goes off even under retention pressure);
* irrelevant: ``s >= t`` and ``r < t``;
* ambiguous: ``r >= t`` and ``s < t`` (contradictory; rare, reported rather than hidden).

The API follows inteprelens (``CHG``, ``CHGTrainer``, ``CHGResults``, ``CHGDataset``,
``CausalCircuitAttribution``) with the same names and defaults. Where fastgim differs on purpose an
option gives inteprelens' behaviour: ``CHGResults(convention="inteprelens")`` (its head labels),
``CHGTrainer(numerics="inteprelens")`` (bf16 autocast, mean over masks, joint clipping, its batch
order), ``CHGDataset.from_texts(tokenization="inteprelens")`` and
``CausalCircuitAttribution(method="grad_norm")``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgim import o_proj_gates, validation
from fastgim.adapters import ModelAdapter, find_layout, get_adapter
from fastgim.chg_data import CHGDataset, MaskedSequenceDataset, _encode  # noqa: F401  (re-exported)
from fastgim.integrations import hf
from fastgim.params import no_parameter_grads
from fastgim.settings import use_settings

STAGES = ("none", "retention", "removal")
INTEPRELENS_STAGE_NAMES = {"none": "none", "retention": "positive", "removal": "negative"}
"""inteprelens' name of each stage (the sign of lambda), reported in ``metrics["regularization"]``."""
_STAGE_ALIASES = {"unregularized": "none",
                  **{theirs: ours for ours, theirs in INTEPRELENS_STAGE_NAMES.items() if theirs != ours}}
TAXONOMY = ("facilitating", "interfering", "irrelevant", "ambiguous")


def canonical_stage(stage: str) -> str:
    """``"none"``, ``"retention"`` or ``"removal"`` for a stage name or its inteprelens alias."""
    name = _STAGE_ALIASES.get(stage, stage)
    if name not in STAGES:
        raise ValueError(
            f"unknown CHG stage {stage!r}; use one of {', '.join(STAGES)} "
            f"(aliases: {', '.join(f'{k}={v}' for k, v in _STAGE_ALIASES.items())})"
        )
    return name


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _head_counts(model: nn.Module) -> tuple[int, int]:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} is not a Hugging Face transformers model (no .config)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    if not layers or not heads:
        raise TypeError(f"cannot read num_hidden_layers / num_attention_heads from {type(config).__name__}")
    return int(layers), int(heads)


# --------------------------------------------------------------------------- gated model


class CHG:
    """A Hugging Face causal LM with per-(layer, head) gates fused into its attention op.

    Example::

        chg = CHG(model)
        logits = chg.create_masks(num_masks=4)          # (4, layers, heads) logits, a Parameter
        logp = chg.get_logp(logits.sigmoid(), input_ids, loss_masks, agg="mean")   # (batch, 4)

    Args:
        model: the causal LM (not modified: no hooks or settings stay on it outside a call).
        adapter: a :class:`fastgim.adapters.ModelAdapter` (or an inteprelens-style subclass overriding
            ``get_layers`` and ``get_attention_output_proj``); default :func:`fastgim.adapters.get_adapter`
            when the model has a known layout. ``num_layers`` / ``num_heads`` / ``head_dim`` come from it
            when given, else from the model's config.
        gate: where the gates act. ``"fused"``: inside fastgim's attention op (the model runs
            ``gim_fused`` attention during the call); ``"hook"``: inteprelens' way, forward pre-hooks on
            each layer's attention output projection (found through the adapter) multiply each head's
            slice of its input, with the model's own attention; ``"auto"`` (default): fused when the
            model routes its attention through transformers' ``AttentionInterface``, else hooks. Both
            multiply the same head outputs by the same gates, so they agree to rounding.
    """

    def __init__(self, model: nn.Module, adapter: Any = None, gate: Literal["auto", "fused", "hook"] = "auto"):
        if gate not in ("auto", "fused", "hook"):
            raise ValueError(f"gate must be 'auto', 'fused' (fastgim's attention op) or 'hook' (pre-hooks on the "
                             f"attention output projections), got {gate!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"CHG expects a torch model (nn.Module), got {type(model).__name__}")
        self.model = model
        self._adapter = adapter
        self.compiled_model: nn.Module | None = None
        if gate == "auto":
            gate = "fused" if hf.supports_gim_fused(model) else "hook"
        if gate == "fused":
            hf.check_supported(model)
        elif adapter is None and find_layout(model) is None:
            hf.check_supported(model)  # no adapter, no fused attention: say what is supported
            raise ValueError(f"{type(model).__name__} has no layout fastgim knows; pass adapter= (a ModelAdapter "
                             "subclass overriding get_layers and get_attention_output_proj) for gate='hook'")
        self.gate = gate
        if adapter is not None:
            self.num_layers, self.num_heads = int(adapter.num_layers), int(adapter.num_heads)
        else:
            self.num_layers, self.num_heads = _head_counts(model)

    @property
    def adapter(self) -> ModelAdapter:
        """The adapter given to the constructor, else :func:`fastgim.adapters.get_adapter` of the model."""
        if self._adapter is None:
            self._adapter = get_adapter(self.model)
        return self._adapter

    @property
    def head_dim(self) -> int:
        """Width of one head's output: the adapter's ``head_dim`` (the config's explicit ``head_dim`` when set,
        else ``hidden_size // num_heads``, as inteprelens' adapters)."""
        if self._adapter is not None or find_layout(self.model) is not None:
            return int(self.adapter.head_dim)
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        explicit = getattr(text, "head_dim", None)
        return int(explicit) if explicit else int(text.hidden_size) // self.num_heads

    @property
    def device(self) -> torch.device:
        return _model_device(self.model)

    @property
    def mask_shape(self) -> tuple[int, int]:
        """``(num_layers, num_heads)``."""
        return (self.num_layers, self.num_heads)

    def compile(self, mode: str | None = "reduce-overhead", **kwargs: Any) -> CHG:
        """Run this CHG's forward passes through ``torch.compile(self.model, mode=mode, **kwargs)``; returns ``self``.

        The compiled wrapper is kept in ``self.compiled_model`` and used by :meth:`forward`,
        :meth:`get_logp` and :meth:`token_logp`. With ``gate="fused"`` masked calls run compiled too
        (the gates are read at run time, so new gate values do not recompile). With ``gate="hook"`` only
        unmasked calls do: ``torch.compile`` does not notice forward hooks added after a graph was traced
        (the caveat inteprelens documents), so gated calls run the model uncompiled rather than risk a
        graph without the gates. ``self.model`` stays the model you passed: ``torch.compile`` wraps it
        without copying or changing it (same parameters, no hooks, no settings), and other code using
        the model runs it uncompiled. inteprelens instead replaces ``chg.model`` by the wrapper and
        supports only unmasked calls after compiling. The first call compiles (seconds to minutes);
        ``mode="reduce-overhead"`` uses CUDA graphs on the GPU, on the CPU it compiles as the default mode.
        """
        self.compiled_model = torch.compile(self.model, mode=mode, **kwargs)
        return self

    def _runner(self, gated: bool) -> nn.Module:
        """The compiled wrapper when there is one, except for calls with hook gates (see :meth:`compile`)."""
        hooked = self.gate == "hook" and (gated or o_proj_gates.active())  # also inside a caller's gating block
        if self.compiled_model is None or hooked:
            return self.model
        return self.compiled_model

    def create_masks(
        self,
        num_masks: int | None = None,
        mask_init_range: tuple[float, float] = (0.0, 1.0),
        as_parameter: bool = True,
        as_logits: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Masks drawn uniform in ``mask_init_range``: ``(L, H)`` or ``(num_masks, L, H)`` float32.

        With ``as_logits`` the values are stored as logits (``sigmoid`` gives the gates back);
        with ``as_parameter`` the result is an ``nn.Parameter``.
        """
        if num_masks is not None and num_masks < 1:
            raise ValueError(f"num_masks must be >= 1 (or None for a single mask), got {num_masks}")
        low, high = mask_init_range
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"mask_init_range must satisfy 0 <= low <= high <= 1, got {mask_init_range}")
        shape = self.mask_shape if num_masks is None else (num_masks, *self.mask_shape)
        masks = low + (high - low) * torch.rand(shape, generator=generator)
        if as_logits:
            masks = torch.logit(masks.clamp(1e-6, 1 - 1e-6))
        masks = masks.to(self.device)
        return nn.Parameter(masks) if as_parameter else masks

    @contextlib.contextmanager
    def gating(self, gates: Tensor) -> Iterator[None]:
        """Run the model with ``gates`` ``(L, H)`` or ``(batch, L, H)`` in ``[0, 1]`` applied to head outputs.

        With ``gate="fused"`` the model is switched to ``gim_fused`` attention for the block if it is
        not on it; with ``gate="hook"`` the gates go through pre-hooks on the attention output
        projections, cast to the model's parameter dtype first (as inteprelens). GIM is off inside
        (CHG uses the ordinary gradient).
        """
        self._check_gates(gates, allow_batch=True)
        if self.gate == "hook":
            dtype = next(self.model.parameters()).dtype
            with o_proj_gates.o_proj_head_gates(self.adapter, gates, self.num_heads, self.head_dim, dtype=dtype), \
                    use_settings(None):
                yield
            return
        with hf.use_gim_fused(self.model), hf.head_gates(gates), use_settings(None):
            yield

    def register_mask_hooks(self, masks: Tensor) -> contextlib.AbstractContextManager:
        """inteprelens' name of :meth:`gating` (with ``gate="hook"`` it registers hooks as inteprelens does)."""
        return self.gating(masks)

    def remove_hooks(self) -> None:
        """inteprelens API; nothing to remove (hooks and gates live only inside :meth:`gating` blocks)."""

    def _check_gates(self, gates: Tensor, allow_batch: bool) -> None:
        ok = gates.dim() == 2 or (allow_batch and gates.dim() == 3)
        if not ok or tuple(gates.shape[-2:]) != self.mask_shape:
            raise ValueError(
                f"masks must have shape {self.mask_shape} or (num_masks, {self.num_layers}, {self.num_heads}), "
                f"got {tuple(gates.shape)}"
            )

    def forward(self, input_ids: Tensor, masks: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """Logits with head masks applied.

        Args:
            input_ids: ``(batch, seq)`` int64.
            masks: gates in ``[0, 1]``: None, ``(L, H)`` or ``(num_masks, L, H)``.
            attention_mask: optional ``(batch, seq)`` padding mask.

        Returns:
            ``(batch, seq, vocab)`` without masks or with a single ``(L, H)`` mask,
            ``(batch, num_masks, seq, vocab)`` with several.
        """
        self.check_inputs(input_ids, attention_mask)
        if masks is None:
            return self._runner(gated=False)(input_ids=input_ids, attention_mask=attention_mask).logits
        single = masks.dim() == 2
        masks = masks.unsqueeze(0) if single else masks
        self._check_gates(masks, allow_batch=True)
        batch, num_masks = input_ids.shape[0], masks.shape[0]
        ids = input_ids.repeat(num_masks, 1)
        mask2d = None if attention_mask is None else attention_mask.repeat(num_masks, 1)
        with self.gating(masks.repeat_interleave(batch, dim=0)):
            logits = self._runner(gated=True)(input_ids=ids, attention_mask=mask2d).logits
        logits = logits.view(num_masks, batch, *logits.shape[1:]).transpose(0, 1)
        return logits[:, 0] if single else logits

    __call__ = forward

    def check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        """``(batch, seq)`` integer ids in the vocabulary and a 0/1 mask with a real token per row."""
        ids = validation.token_ids(input_ids, validation.vocabulary_size(self.model))
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
        if attention_mask is not None:
            validation.attention_mask(attention_mask, ids)

    def token_logp(self, masks: Tensor, input_ids: Tensor, loss_masks: Tensor) -> Tensor:
        """Log-probabilities of the target tokens, ``(num_masks, batch, seq)`` float32, 0 off-target.

        ``masks`` are gates ``(num_masks, L, H)``. Logits are computed only at positions that
        predict a target token of some row (``logits_to_keep``), in float32.
        """
        self._check_gates(masks, allow_batch=True)
        if masks.dim() == 2:
            masks = masks.unsqueeze(0)
        self.check_inputs(input_ids)
        if input_ids.shape != loss_masks.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_masks {tuple(loss_masks.shape)} differ")
        batch, seq = input_ids.shape
        num_masks = masks.shape[0]
        loss_masks = loss_masks.to(torch.bool)
        keep = loss_masks[:, 1:].any(dim=0).nonzero().flatten()  # positions p predicting token p + 1
        ids = input_ids.repeat(num_masks, 1)
        with self.gating(masks.repeat_interleave(batch, dim=0)):
            logits = self._runner(gated=True)(input_ids=ids, logits_to_keep=keep).logits
        logp = F.log_softmax(_at_least_fp32(logits), dim=-1)
        targets = input_ids[:, keep + 1].repeat(num_masks, 1)
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).view(num_masks, batch, -1)
        out = picked.new_zeros(num_masks, batch, seq)
        out[:, :, keep + 1] = picked
        return out.masked_fill(~loss_masks.unsqueeze(0), 0.0)

    def get_logp(
        self,
        masks: Tensor,
        input_ids: Tensor,
        loss_masks: Tensor,
        agg: Literal["none", "sum", "mean"] = "sum",
        return_accuracy: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Log-probability of the target tokens under the gated model (inteprelens' ``get_logp``).

        Args:
            masks: gates in ``[0, 1]``, ``(L, H)`` or ``(num_masks, L, H)``.
            input_ids: ``(batch, seq)``; loss_masks: ``(batch, seq)`` bool, True at target tokens.
            agg: ``"none"`` per token ``(..., seq - 1)`` (aligned with ``input_ids[:, 1:]``),
                ``"sum"`` or ``"mean"`` over target tokens.
            return_accuracy: also return the fraction of target tokens predicted by argmax.

        Returns:
            ``(batch, num_masks[, seq - 1])`` float32, without the mask axis for a single ``(L, H)`` mask.
        """
        if agg not in ("none", "sum", "mean"):
            raise ValueError(f"agg must be 'none', 'sum' or 'mean', got {agg!r}")
        single = masks.dim() == 2
        if return_accuracy:
            logits = _at_least_fp32(self.forward(input_ids[:, :-1], masks.unsqueeze(0) if single else masks))
            targets = input_ids[:, 1:].unsqueeze(1)
            tmask = loss_masks[:, 1:].to(torch.bool).unsqueeze(1)
            logp = logits.log_softmax(-1).gather(-1, targets.expand(*logits.shape[:3]).unsqueeze(-1)).squeeze(-1)
            logp = logp * tmask
            correct = ((logits.argmax(-1) == targets) & tmask).sum(-1)
            accuracy = correct / tmask.sum(-1).clamp(min=1)
        else:
            logp = self.token_logp(masks, input_ids, loss_masks)[..., 1:].permute(1, 0, 2)
            tmask = loss_masks[:, 1:].to(torch.bool).unsqueeze(1)
        if agg != "none":
            logp = logp.sum(-1)
            if agg == "mean":
                logp = logp / tmask.sum(-1).clamp(min=1)
        if single:
            logp = logp[:, 0]
        if not return_accuracy:
            return logp
        return logp, accuracy[:, 0] if single else accuracy


# --------------------------------------------------------------------------- training


_AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": None, "float32": None}


def _autocast_dtype(autocast: str | torch.dtype | None, numerics: str) -> torch.dtype | None:
    """The autocast dtype for CHGTrainer's ``autocast`` option (None = no autocast)."""
    if autocast is None:
        return torch.bfloat16 if numerics == "inteprelens" else None
    if isinstance(autocast, torch.dtype):
        return None if autocast == torch.float32 else autocast
    if autocast not in _AUTOCAST:
        raise ValueError(f"autocast must be 'bf16', 'fp16', 'fp32', a torch dtype or None, got {autocast!r}")
    return _AUTOCAST[autocast]




class CHGTrainer:
    """Learns CHG gate logits in three stages (see the module docstring); yields metrics per update.

    Args:
        model: a Hugging Face causal LM (any attention implementation; it is switched to
            ``gim_fused`` while a batch runs). Its parameters get no gradient.
        dataset: a :class:`CHGDataset`.
        num_masks: masks learned at once (independent restarts); None for a single ``(L, H)`` mask.
        mask_init_range: gates start uniform in this range.
        batch_size: prompts per update (the model sees ``batch_size * num_masks`` rows).
        l1_weight: lambda of the regularised stages (retention +l1_weight, removal -l1_weight).
        l1_clamp: logits are clamped to ``[-l1_clamp, l1_clamp]`` inside the penalty.
        lr, lr_end: Adam learning rate of the unregularised stage (linear decay to ``lr_end`` if given).
        lr_reg, lr_reg_end: the same for the regularised stages.
        gradient_accum_steps: micro-batches per update.
        grad_norm: per-mask gradient-norm clip (None: no clipping). Clipping each mask on its own
            keeps the masks independent.
        adapter: a :class:`fastgim.adapters.ModelAdapter` (an inteprelens-style subclass works), passed to
            :class:`CHG`: a model whose attention cannot take the fused gate is gated through it.
        device: accepted for inteprelens compatibility; the masks live on the model's device.
        seed: seeds the gate initialisation and the batch order (None: global RNG).
        l1_reduction: ``"mean"`` (default, as the reference CHG code: the pressure per head does not
            grow with the number of heads) or ``"sum"`` over the ``(L, H)`` clamped logits.
        nll_reduction: ``"mean"`` (default, as the reference CHG code: mean over prompts of each
            prompt's mean target-token NLL) or ``"sum"`` (summed over target tokens and prompts,
            the paper's ``-sum log P(y | x)`` on each micro-batch). See the module docstring.
        numerics: ``"fastgim"`` (default: float32, each mask's loss and gradient clip on its own, so
            the masks are independent restarts) or ``"inteprelens"``: inteprelens' training numerics,
            bf16 autocast (unless ``autocast`` says otherwise), the loss averaged over the masks, one
            gradient-norm clip over all masks jointly, and batches in inteprelens' ``DataLoader``
            order (``seed`` must then be None; seed with ``torch.manual_seed``). Its loss is computed
            op for op as inteprelens does, with the model's own attention (``sdpa`` for a ``gim_fused``
            model) and the gates applied by pre-hooks on the attention output projections, so on the
            same machine the gates equal inteprelens' bit for bit (a model of no known layout and no
            adapter uses the fused gate instead, which rounds differently).
        autocast: ``"bf16"`` / ``"fp16"`` / a torch dtype runs the forward and loss under
            ``torch.autocast`` in that dtype, ``"fp32"`` without; None = bf16 for
            ``numerics="inteprelens"``, fp32 otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: CHGDataset,
        num_masks: int | None = None,
        mask_init_range: tuple[float, float] = (0.0, 1.0),
        batch_size: int = 32,
        l1_weight: float = 0.1,
        l1_clamp: float = 4.0,
        lr: float = 1.0,
        lr_end: float | None = None,
        lr_reg: float = 1.0,
        lr_reg_end: float | None = None,
        gradient_accum_steps: int = 1,
        grad_norm: float | None = 1.0,
        adapter: Any = None,
        device: str | None = None,
        seed: int | None = None,
        l1_reduction: Literal["mean", "sum"] = "mean",
        nll_reduction: Literal["mean", "sum"] = "mean",
        numerics: Literal["fastgim", "inteprelens"] = "fastgim",
        autocast: str | torch.dtype | None = None,
    ):
        if numerics not in ("fastgim", "inteprelens"):
            raise ValueError(f"numerics must be 'fastgim' or 'inteprelens', got {numerics!r}")
        self.numerics = numerics
        self.autocast_dtype = _autocast_dtype(autocast, numerics)
        if not isinstance(dataset, CHGDataset):
            raise TypeError(f"dataset must be a CHGDataset (e.g. CHGDataset.from_texts), got {type(dataset).__name__}")
        if batch_size < 1 or gradient_accum_steps < 1:
            raise ValueError(f"batch_size and gradient_accum_steps must be >= 1, got {batch_size}, "
                             f"{gradient_accum_steps}")
        for name, value in (("l1_clamp", l1_clamp), ("lr", lr), ("lr_reg", lr_reg)):
            validation.finite_number(value, name, positive=True)
        for name, value in (("lr_end", lr_end), ("lr_reg_end", lr_reg_end), ("grad_norm", grad_norm)):
            if value is not None:
                validation.finite_number(value, name, non_negative=True)
        validation.finite_number(l1_weight, "l1_weight", non_negative=True)
        if l1_reduction not in ("mean", "sum"):
            raise ValueError(f"l1_reduction must be 'mean' or 'sum', got {l1_reduction!r}")
        if nll_reduction not in ("mean", "sum"):
            raise ValueError(f"nll_reduction must be 'mean' or 'sum', got {nll_reduction!r}")
        self.l1_reduction, self.nll_reduction = l1_reduction, nll_reduction
        hooks = numerics == "inteprelens" and (adapter is not None or find_layout(model) is not None)
        self.masked_model = CHG(model, adapter=adapter, gate="hook" if hooks else "auto")
        self.masked_model.check_inputs(dataset.input_ids)
        self.model = model
        self.dataset = dataset
        self.single_mask = num_masks is None
        self.num_masks = 1 if num_masks is None else num_masks
        self.batch_size, self.l1_weight, self.l1_clamp = batch_size, float(l1_weight), float(l1_clamp)
        self.lr, self.lr_end, self.lr_reg, self.lr_reg_end = lr, lr_end, lr_reg, lr_reg_end
        self.gradient_accum_steps, self.grad_norm = gradient_accum_steps, grad_norm
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.mask_logits = self.masked_model.create_masks(self.num_masks, mask_init_range, generator=generator)
        self.mask_logits_retention: nn.Parameter | None = None
        self.mask_logits_removal: nn.Parameter | None = None
        self.iterator = dataset.training_batches(batch_size, shuffle=True, seed=seed,
                                                 order="inteprelens" if numerics == "inteprelens" else "fastgim")
        del device  # the masks live on the model's device

    def stage_parameter(self, stage: str) -> nn.Parameter:
        """The logits ``(num_masks, L, H)`` trained by ``stage``; the regularised ones start from stage ``none``."""
        stage = canonical_stage(stage)
        if stage == "none":
            return self.mask_logits
        attr = f"mask_logits_{stage}"
        if getattr(self, attr) is None:
            setattr(self, attr, nn.Parameter(self.mask_logits.detach().clone()))
        return getattr(self, attr)

    def stage_lambda(self, stage: str) -> float:
        """lambda of ``stage``: 0, +l1_weight (retention, gates pushed to 1), -l1_weight (removal, to 0)."""
        return {"none": 0.0, "retention": self.l1_weight, "removal": -self.l1_weight}[canonical_stage(stage)]

    def loss(self, logits: Tensor, batch: dict[str, Tensor], lam: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-mask ``(loss, nll, penalty)``, each ``(num_masks,)``.

        nll is the mean over prompts of the mean negative log-prob of their target tokens (the sum
        over all target tokens with ``nll_reduction="sum"``); penalty is
        ``lambda * mean(clamp(logits))`` over layers and heads (``sum`` with ``l1_reduction="sum"``).
        """
        loss_masks = batch["loss_masks"]
        with self._autocast():
            token_logp = self.masked_model.token_logp(logits.sigmoid(), batch["input_ids"], loss_masks)
        if self.nll_reduction == "sum":
            nll = -token_logp.sum(dim=(-2, -1))
        else:
            nll = -(token_logp.sum(-1) / loss_masks.sum(-1).clamp(min=1)).mean(-1)
        clamped = logits.clamp(-self.l1_clamp, self.l1_clamp)
        penalty = lam * (clamped.mean(dim=(-2, -1)) if self.l1_reduction == "mean" else clamped.sum(dim=(-2, -1)))
        return nll - penalty, nll, penalty

    def _attention(self) -> contextlib.AbstractContextManager:
        """The attention the stage runs: ``gim_fused`` for the fused gate, the model's own with hooks.

        ``numerics="inteprelens"`` runs a ``gim_fused`` model's calls through transformers' sdpa, the
        attention inteprelens' model has.
        """
        if self.masked_model.gate == "fused":
            return hf.use_gim_fused(self.model)
        return hf.plain_sdpa() if self.numerics == "inteprelens" else contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.masked_model.device.type, dtype=self.autocast_dtype)

    def _clip(self, logits: nn.Parameter) -> Tensor:
        """Clip the gradient (per mask, or jointly over all masks as inteprelens); returns the per-mask norms before."""
        grad = logits.grad
        norms = grad.flatten(1).norm(dim=1)
        if self.grad_norm is None:
            return norms
        if self.numerics == "inteprelens":
            torch.nn.utils.clip_grad_norm_([logits], max_norm=self.grad_norm)
        else:
            grad.mul_((self.grad_norm / (norms + 1e-6)).clamp(max=1.0).view(-1, 1, 1))
        return norms

    def _inteprelens_loss(self, logits: Tensor, batch: dict[str, Tensor], lam: float) -> tuple[Tensor, Tensor, Tensor]:
        """inteprelens' loss, computed op for op as it does: ``(loss, nll per mask, penalty)``.

        Rows in (prompt, mask) order, the full-vocabulary logits of ``input_ids[:, :-1]`` under autocast,
        the cross-entropy on them, the mean over prompts and masks, all divided by the accumulation steps.
        The model runs its own attention (``sdpa`` for a ``gim_fused`` model) with the gates applied by
        pre-hooks on the output projections, so the values and gradients are inteprelens' to the bit.
        """
        ids, loss_masks = batch["input_ids"], batch["loss_masks"]
        batch_size, num_masks, steps = ids.shape[0], logits.shape[0], self.gradient_accum_steps
        with self._autocast():
            gates = logits.sigmoid()
            rows = gates.unsqueeze(0).expand(batch_size, *gates.shape).reshape(batch_size * num_masks, *gates.shape[1:])
            inputs = ids[:, :-1].unsqueeze(1).expand(batch_size, num_masks, -1).reshape(batch_size * num_masks, -1)
            with self.masked_model.gating(rows):
                out = self.masked_model._runner(gated=True)(inputs).logits
            out = out.view(batch_size, num_masks, *out.shape[1:])
            targets = ids[:, 1:].unsqueeze(1).expand(batch_size, num_masks, -1)
            target_mask = loss_masks[:, 1:].unsqueeze(1).expand(batch_size, num_masks, -1)
            token_nll = F.cross_entropy(out.permute(0, 3, 1, 2), targets, reduction="none")
            logp = (-(token_nll * target_mask)).sum(dim=-1) / target_mask.sum(dim=-1).clamp(min=1)
            nll = -logp.mean() / steps
            penalty = lam * logits.clamp(-self.l1_clamp, self.l1_clamp).mean() / steps if lam else logits.new_zeros(())
            loss = nll - penalty
        return loss, -logp.detach().mean(0), penalty.detach() * steps

    def _optimizer(self, logits: nn.Parameter, stage: str, num_updates: int):
        lr, lr_end = (self.lr, self.lr_end) if stage == "none" else (self.lr_reg, self.lr_reg_end)
        optimizer = torch.optim.Adam([logits], lr=lr)
        scheduler = None
        if lr_end is not None:
            scheduler = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0, end_factor=lr_end / lr, total_iters=max(num_updates, 1))
        return optimizer, scheduler

    def _update(self, logits: nn.Parameter, lam: float) -> dict[str, Any]:
        nll_sum = torch.zeros(self.num_masks)
        penalty = torch.zeros(self.num_masks)
        for _ in range(self.gradient_accum_steps):
            if self.numerics == "inteprelens":
                loss, nll, pen = self._inteprelens_loss(logits, next(self.iterator), lam)
                loss.backward()
            else:
                loss, nll, pen = self.loss(logits, next(self.iterator), lam)
                (loss.sum() / self.gradient_accum_steps).backward()
            nll_sum += nll.detach().float().cpu() / self.gradient_accum_steps
            penalty = pen.detach().float().cpu()
        norms = self._clip(logits)
        return {"nll": float(nll_sum.mean()), "L1": float(penalty.mean()), "nll_per_mask": nll_sum.tolist(),
                "grad_norm": float(norms.mean())}

    def fit_stage(
        self,
        stage: str,
        num_updates: int,
        show_progress: bool = True,
        callback: Callable[[Tensor, dict[str, Any]], None] | None = None,
    ) -> Generator[tuple[Tensor, dict[str, Any]], None, None]:
        """Train one stage; after each update yield ``(gates, metrics)``.

        ``gates`` is ``sigmoid(logits)`` on the CPU, ``(L, H)`` for a single mask else ``(num_masks, L, H)``.
        ``metrics`` has inteprelens' keys ``regularization`` (its stage name: ``"none"``, ``"positive"`` for
        retention, ``"negative"`` for removal, by the sign of lambda), ``num_update``, ``nll`` (mean over
        masks; inteprelens reports 0.0 there, a bug) and ``L1`` (the penalty ``lambda * mean(clamp(logits))``;
        0.0 in inteprelens), then ``stage`` (``"none"``, ``"retention"``, ``"removal"``), ``nll_per_mask``, ``lambda``, ``lr``,
        ``grad_norm`` (before clipping), ``mean_gate``, ``frac_on`` (gates >= 0.5) and ``seconds``.
        """
        from tqdm.auto import tqdm

        stage = canonical_stage(stage)
        if num_updates < 0:
            raise ValueError(f"num_updates must be >= 0, got {num_updates}")
        logits, lam = self.stage_parameter(stage), self.stage_lambda(stage)
        optimizer, scheduler = self._optimizer(logits, stage, num_updates)
        with no_parameter_grads(self.model), self._attention():  # switched once per stage
            bar = tqdm(range(num_updates), desc=f"CHG {stage}", disable=not show_progress, leave=False)
            for update in bar:
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                metrics = self._update(logits, lam)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                gates = logits.detach().sigmoid().cpu()
                metrics = {"regularization": INTEPRELENS_STAGE_NAMES[stage], "num_update": update + 1, **metrics,
                           "stage": stage, "lambda": lam, "lr": lr,
                           "mean_gate": float(gates.mean()), "frac_on": float((gates >= 0.5).float().mean()),
                           "seconds": time.perf_counter() - start}
                bar.set_postfix(nll=f"{metrics['nll']:.3f}", on=f"{metrics['frac_on']:.2f}")
                mask = gates[0] if self.single_mask else gates
                if callback is not None:
                    callback(mask, metrics)
                yield mask, metrics

    def fit(
        self,
        num_updates: int = 500,
        num_reg_updates: int = 500,
        save_path: str | Path | None = None,
        verbose: bool = True,
        callback: Callable[[Tensor, dict[str, Any]], None] | None = None,
    ) -> Generator[tuple[Tensor, dict[str, Any]], None, None]:
        """All three stages: ``none`` (num_updates), then ``retention`` and ``removal`` (num_reg_updates each).

        Yields ``(gates, metrics)`` per update as :meth:`fit_stage`. ``save_path`` (a directory)
        receives the results so far (:meth:`CHGResults.save`) after each stage.
        """
        history: dict[str, list[Tensor]] = {stage: [] for stage in STAGES}
        metrics_log: list[dict[str, Any]] = []
        for stage, count in zip(STAGES, (num_updates, num_reg_updates, num_reg_updates)):
            for mask, metrics in self.fit_stage(stage, count, show_progress=verbose, callback=callback):
                history[stage].append(mask)
                metrics_log.append(metrics)
                yield mask, metrics
            if save_path is not None:
                self.results(history, metrics_log).save(save_path)

    def results(self, history: dict[str, list[Tensor]], metrics: list[dict[str, Any]]) -> CHGResults:
        """:class:`CHGResults` from the gates yielded per stage."""
        masks = {stage: torch.stack(items) for stage, items in history.items() if items}
        config = {"num_layers": self.masked_model.num_layers, "num_heads": self.masked_model.num_heads,
                  "model_class": type(self.model).__name__, "num_masks": self.num_masks,
                  "l1_weight": self.l1_weight, "l1_clamp": self.l1_clamp, "lr": self.lr, "lr_reg": self.lr_reg,
                  "batch_size": self.batch_size, "grad_norm": self.grad_norm}
        return CHGResults(masks=masks, metrics=metrics, model_config=config)

    @property
    def mask_logits_pos(self) -> nn.Parameter | None:
        """inteprelens' name of the retention-stage logits (its "positive" stage)."""
        return self.mask_logits_retention

    @property
    def mask_logits_neg(self) -> nn.Parameter | None:
        """inteprelens' name of the removal-stage logits (its "negative" stage)."""
        return self.mask_logits_removal

    def get_final_masks(self) -> dict[str, Tensor | None]:
        """Final gates per stage (``unregularized``, ``retention``, ``removal``); None for a stage not run.

        The retention / removal gates are also under ``"positive"`` / ``"negative"`` (inteprelens' stage names).
        """
        def gates(p: Tensor | None) -> Tensor | None:
            if p is None:
                return None
            g = p.detach().sigmoid().cpu()
            return g[0] if self.single_mask else g
        return StageMasks({"unregularized": gates(self.mask_logits), "retention": gates(self.mask_logits_retention),
                           "removal": gates(self.mask_logits_removal)})


# --------------------------------------------------------------------------- results


def _metric_stage(metrics: dict[str, Any]) -> str | None:
    """The canonical stage of one metrics record (fastgim's ``stage``, else its ``regularization``)."""
    name = metrics.get("stage", metrics.get("regularization"))
    return _STAGE_ALIASES.get(name, name)


def classify_heads(retention: Tensor, removal: Tensor, threshold: float) -> list[list[str]]:
    """Taxonomy label per head from ``(L, H)`` retention and removal gates (module docstring rules)."""
    on_ret, on_rem = retention >= threshold, removal >= threshold
    labels = []
    for layer in range(retention.shape[0]):
        row = []
        for head in range(retention.shape[1]):
            s, r = bool(on_ret[layer, head]), bool(on_rem[layer, head])
            row.append("facilitating" if r and s else "ambiguous" if r else "irrelevant" if s else "interfering")
        labels.append(row)
    return labels


class HeadList(list):
    """A list of ``(layer, head)`` pairs with pandas' ``head(n)``, as inteprelens' README calls it.

    (inteprelens 0.2.1 returns a plain list there, so its own quick start stops at ``.head()``.)
    """

    def head(self, n: int = 5) -> HeadList:
        """The first ``n`` pairs (all but the last ``-n`` for negative ``n``, as in pandas)."""
        return HeadList(self[:n])


class StageMasks(dict):
    """The gates per stage, also reachable by inteprelens' stage names (``"positive"``, ``"negative"``)."""

    def _key(self, stage: Any) -> Any:
        if not isinstance(stage, str) or super().__contains__(stage):
            return stage
        return _STAGE_ALIASES.get(stage, stage)

    def __getitem__(self, stage: str) -> Tensor:
        return super().__getitem__(self._key(stage))

    def __contains__(self, stage: object) -> bool:
        return super().__contains__(self._key(stage))

    def get(self, stage: str, default: Any = None) -> Any:
        return super().get(self._key(stage), default)


@dataclass
class CHGResults:
    """Gates from a CHG fit and the analyses on them (inteprelens' ``CHGResults`` API).

    Attributes:
        masks: stage (``"none"``, ``"retention"``, ``"removal"``) -> gates per update,
            ``(num_updates, num_masks, L, H)`` or ``(num_updates, L, H)`` for a single mask, float32.
        metrics: the per-update metric dicts yielded by :class:`CHGTrainer`.
        model_config: ``num_layers``, ``num_heads``, ``model_class`` and the training settings.
        threshold: default gate threshold for "on" (0.5).
        convention: ``"paper"`` (default) labels heads as the CHG paper: necessary = on under
            removal pressure, sufficient = on under retention pressure. ``"inteprelens"`` reproduces
            inteprelens' labels on the same gates: necessary = on under retention pressure (its
            "positive" stage), sufficient = on under removal pressure, and three taxonomy classes
            (facilitating = both on, interfering = only the removal-stage gate on, irrelevant = the
            rest), with inteprelens' column names, summary keys and ``to_dataframe`` numbering.

    ``masks`` also answers to inteprelens' stage names (``masks["positive"]`` is the retention stage,
    ``masks["negative"]`` the removal stage, ``masks["unregularized"]`` stage ``none``).
    """

    masks: dict[str, Tensor]
    metrics: list[dict[str, Any]] | None = None
    model_config: dict[str, Any] | None = None
    threshold: float = 0.5
    convention: Literal["paper", "inteprelens"] = "paper"
    _single: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.convention not in ("paper", "inteprelens"):
            raise ValueError(f"convention must be 'paper' or 'inteprelens', got {self.convention!r}")
        masks = {canonical_stage(k): v for k, v in self.masks.items() if v is not None}
        if not masks:
            raise ValueError("CHGResults needs the gates of at least one stage")
        dims = {v.dim() for v in masks.values()}
        if len(dims) != 1 or dims.pop() not in (3, 4):
            raise ValueError("masks must all be (updates, L, H) or all (updates, num_masks, L, H)")
        self._single = next(iter(masks.values())).dim() == 3
        self.masks = StageMasks({k: v.detach().float().cpu() for k, v in masks.items()})

    # ---- shapes
    def _first(self) -> Tensor:
        return next(iter(self.masks.values()))

    @property
    def num_layers(self) -> int:
        return int(self._first().shape[-2])

    @property
    def num_heads(self) -> int:
        return int(self._first().shape[-1])

    @property
    def num_masks(self) -> int | None:
        """Number of masks, None for a single-mask fit (inteprelens convention)."""
        return None if self._single else int(self._first().shape[1])

    def final_masks(self, stage: str) -> Tensor:
        """Final gates of ``stage`` as ``(num_masks, L, H)`` (num_masks = 1 for a single-mask fit)."""
        stage = canonical_stage(stage)
        if stage not in self.masks:
            raise ValueError(f"no gates for stage {stage!r}; this result has {', '.join(self.masks)}")
        final = self.masks[stage][-1]
        return final.unsqueeze(0) if self._single else final

    def _select(self, stage: str, mask_idx: int | None) -> Tensor:
        final = self.final_masks(stage)
        if mask_idx is None:
            return final.mean(0)
        if not -final.shape[0] <= mask_idx < final.shape[0]:
            raise IndexError(f"mask_idx {mask_idx} out of range for {final.shape[0]} masks")
        return final[mask_idx]

    def _threshold(self, threshold: float | None) -> float:
        value = self.threshold if threshold is None else float(threshold)
        if not 0.0 < value < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {value}")
        return value

    @staticmethod
    def _heads(gates: Tensor, threshold: float) -> HeadList:
        return HeadList((int(layer), int(head)) for layer, head in (gates >= threshold).nonzero().tolist())

    # ---- head sets
    def necessary_heads(self, threshold: float | None = None, mask_idx: int | None = None) -> list[tuple[int, int]]:
        """Facilitating heads: ``(layer, head)`` whose removal-stage gate stays >= threshold.

        With several masks the gates are averaged unless ``mask_idx`` picks one. With
        ``convention="inteprelens"``: the heads on under retention pressure instead.
        """
        stage = "retention" if self.convention == "inteprelens" else "removal"
        return self._heads(self._select(stage, mask_idx), self._threshold(threshold))

    def sufficient_heads(self, threshold: float | None = None, mask_idx: int | None = None) -> list[tuple[int, int]]:
        """Heads on under retention pressure: every head except the interfering ones.

        This is the largest set of heads the task tolerates (facilitating + irrelevant). With
        ``convention="inteprelens"``: the heads on under removal pressure instead.
        """
        stage = "removal" if self.convention == "inteprelens" else "retention"
        return self._heads(self._select(stage, mask_idx), self._threshold(threshold))

    def _inteprelens_taxonomy(self, threshold: float, mask_idx: int | None):
        """inteprelens' ``head_taxonomy`` frame: ``layer, head, necessary_mask, sufficient_mask, taxonomy``."""
        import pandas as pd

        necessary, sufficient = self._select("retention", mask_idx), self._select("removal", mask_idx)
        records = []
        for layer in range(self.num_layers):
            for head in range(self.num_heads):
                nec, suf = float(necessary[layer, head]), float(sufficient[layer, head])
                label = "facilitating" if nec >= threshold and suf >= threshold else \
                    "interfering" if suf >= threshold else "irrelevant"
                records.append({"layer": layer, "head": head, "necessary_mask": nec, "sufficient_mask": suf,
                                "taxonomy": label})
        return pd.DataFrame.from_records(records)

    def head_taxonomy(self, threshold: float | None = None, mask_idx: int | None = None):
        """One row per head: ``layer, head, retention_mask, removal_mask, taxonomy, agreement``.

        ``retention_mask`` / ``removal_mask`` are the final gates (mean over masks unless
        ``mask_idx``); ``taxonomy`` classifies those; ``agreement`` is the fraction of the individual
        masks whose own label equals it (1.0 for a single mask). ``necessary_mask`` (= removal) and
        ``sufficient_mask`` (= retention) repeat them under inteprelens' column names.
        """
        import pandas as pd

        t = self._threshold(threshold)
        if self.convention == "inteprelens":
            return self._inteprelens_taxonomy(t, mask_idx)
        retention, removal = self._select("retention", mask_idx), self._select("removal", mask_idx)
        labels = classify_heads(retention, removal, t)
        if mask_idx is None:
            each = [classify_heads(s, r, t) for s, r in zip(self.final_masks("retention"), self.final_masks("removal"))]
        else:
            each = [labels]
        records = []
        for layer in range(self.num_layers):
            for head in range(self.num_heads):
                label = labels[layer][head]
                agree = sum(m[layer][head] == label for m in each) / len(each)
                records.append({"layer": layer, "head": head, "retention_mask": float(retention[layer, head]),
                                "removal_mask": float(removal[layer, head]), "taxonomy": label, "agreement": agree,
                                "necessary_mask": float(removal[layer, head]),
                                "sufficient_mask": float(retention[layer, head])})
        return pd.DataFrame.from_records(records)

    def get_facilitating_mask(self, threshold: float | None = None, mask_idx: int | None = None) -> Tensor:
        """``(L, H)`` float32: 1.0 at facilitating heads, 0.0 elsewhere (usable as gates / ``head_mask``)."""
        t = self._threshold(threshold)
        retention, removal = self._select("retention", mask_idx), self._select("removal", mask_idx)
        return ((removal >= t) & (retention >= t)).float()

    def to_dataframe(self, stage: str = "positive", include_all_updates: bool = False):
        """Long format: ``update, [mask_idx,] layer, head, value`` for the gates of ``stage``.

        The default stage is inteprelens' ``"positive"``, i.e. the retention stage. ``update`` is the
        update's index in the stage (inteprelens numbers the rows it keeps from 0 instead, and so
        does ``convention="inteprelens"``).
        """
        import pandas as pd

        stage = canonical_stage(stage)
        if stage not in self.masks:
            raise ValueError(f"no gates for stage {stage!r}; this result has {', '.join(self.masks)}")
        gates = self.masks[stage]
        first = 0 if include_all_updates else gates.shape[0] - 1
        gates = gates[first:]
        if self._single:
            gates = gates.unsqueeze(1)
        index = torch.cartesian_prod(*(torch.arange(n) for n in gates.shape))
        frame = pd.DataFrame(index.numpy(), columns=["update", "mask_idx", "layer", "head"])
        frame["update"] += 0 if self.convention == "inteprelens" else first
        frame["value"] = gates.flatten().numpy()
        return frame.drop(columns="mask_idx") if self._single else frame

    def summary(self, threshold: float | None = None) -> dict[str, Any]:
        """Counts and percentages of necessary / sufficient heads, taxonomy counts, agreement, final NLLs."""
        t = self._threshold(threshold)
        total = self.num_layers * self.num_heads
        if self.convention == "inteprelens":
            necessary, sufficient = self.necessary_heads(t), self.sufficient_heads(t)
            return {"num_layers": self.num_layers, "num_heads": self.num_heads, "total_heads": total,
                    "num_necessary": len(necessary), "num_sufficient": len(sufficient),
                    "pct_necessary": len(necessary) / total * 100, "pct_sufficient": len(sufficient) / total * 100,
                    "taxonomy_counts": self.head_taxonomy(t)["taxonomy"].value_counts().to_dict()}
        out: dict[str, Any] = {"num_layers": self.num_layers, "num_heads": self.num_heads, "total_heads": total,
                               "num_masks": self.num_masks or 1, "threshold": t}
        if "retention" in self.masks and "removal" in self.masks:
            necessary, sufficient = self.necessary_heads(t), self.sufficient_heads(t)
            taxonomy = self.head_taxonomy(t)
            counts = taxonomy["taxonomy"].value_counts().to_dict()
            out.update({"num_necessary": len(necessary), "num_sufficient": len(sufficient),
                        "pct_necessary": 100.0 * len(necessary) / total,
                        "pct_sufficient": 100.0 * len(sufficient) / total,
                        "taxonomy_counts": {k: int(counts.get(k, 0)) for k in TAXONOMY},
                        "mean_agreement": float(taxonomy["agreement"].mean())})
        for stage in STAGES:
            final = [m for m in self.metrics or [] if _metric_stage(m) == stage]
            if final:
                out[f"final_nll_{stage}"] = final[-1]["nll"]
        return out

    # ---- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``chg_masks.safetensors`` (gates) and ``chg_results.json`` (metrics, config) into directory ``path``.

        A path ending in ``.pt`` writes one file in inteprelens' mask format instead
        (``{"none", "positive", "negative"}`` -> gates, what its ``CHGTrainer(save_path=)`` writes and its
        ``CHGResults.load`` reads); it holds the gates only.
        """
        from safetensors.torch import save_file

        if Path(path).suffix == ".pt":
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            names = {"none": "none", "retention": "positive", "removal": "negative"}
            torch.save({names[k]: v.clone() for k, v in self.masks.items()}, target)
            return target
        directory = Path(path)
        if directory.suffix and directory.exists() and not directory.is_dir():
            raise ValueError(f"CHGResults.save expects a directory, {directory} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.masks.items()}, str(directory / "chg_masks.safetensors"))
        meta = {"format": "fastgim-chg-1", "metrics": self.metrics, "model_config": self.model_config,
                "threshold": self.threshold, "single_mask": self._single, "convention": self.convention}
        (directory / "chg_results.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, path: str | Path, convention: Literal["paper", "inteprelens"] = "paper") -> CHGResults:
        """Read a directory written by :meth:`save`; the gates and metrics come back bit for bit.

        A file is read as inteprelens' ``.pt`` formats (``CHGTrainer`` ``save_path`` files and
        ``CHGResults.save`` files, :func:`fastgim.chg_compat.read_inteprelens_masks`) or fastgim's
        ``.pt`` saves. ``convention`` is that of the returned results.
        """
        from safetensors.torch import load_file

        if Path(path).is_file():
            from fastgim.chg_compat import read_inteprelens_masks

            masks, metrics, config = read_inteprelens_masks(path)
            return cls(masks=masks, metrics=metrics, model_config=config, convention=convention)
        directory = Path(path)
        tensors, meta_path = directory / "chg_masks.safetensors", directory / "chg_results.json"
        if not tensors.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"{directory} has no chg_masks.safetensors / chg_results.json (CHGResults.save)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        masks = load_file(str(tensors))
        ordered = {k: masks[k] for k in STAGES if k in masks}
        return cls(masks=ordered, metrics=meta.get("metrics"), model_config=meta.get("model_config"),
                   threshold=meta.get("threshold", 0.5), convention=meta.get("convention", convention))

    def __repr__(self) -> str:
        return (f"CHGResults(stages={list(self.masks)}, num_layers={self.num_layers}, num_heads={self.num_heads}, "
                f"num_masks={self.num_masks or 1})")


# --------------------------------------------------------------------------- attribution through a circuit


def sentence_char_spans(document: str, sentences: Sequence[str]) -> list[tuple[int, int]]:
    """Character span of each sentence in ``document``, found in order (each after the previous one)."""
    spans, cursor = [], 0
    for i, sentence in enumerate(sentences):
        text = sentence.strip()
        if not text:
            raise ValueError(f"sentence {i} is empty")
        start = document.find(text, cursor)
        if start < 0:
            raise ValueError(f"sentence {i} ({text[:60]!r}) does not occur in the document after character "
                             f"{cursor}; sentences must be verbatim substrings of the document, in order")
        spans.append((start, start + len(text)))
        cursor = start + len(text)
    return spans


def sentence_token_spans(document: str, sentences: Sequence[str], tokenizer: Any) -> tuple[Tensor, list[list[int]]]:
    """Token ids of ``document`` (with special tokens) and, per sentence, the indices of its tokens.

    A token belongs to a sentence when its character offsets overlap the sentence's span;
    needs a tokenizer that returns offsets (a "fast" tokenizer).
    """
    encoding = tokenizer(document, add_special_tokens=True, return_offsets_mapping=True)
    if "offset_mapping" not in encoding:
        raise TypeError("locating sentences needs a fast tokenizer (return_offsets_mapping); load it with use_fast=True")
    offsets = encoding["offset_mapping"]
    members = []
    for start, end in sentence_char_spans(document, sentences):
        members.append([i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start])
    return torch.tensor(encoding["input_ids"], dtype=torch.long), members


class CausalCircuitAttribution:
    """Sentence importance from attribution restricted to a head circuit (inteprelens API).

    ``method="gim"`` (default): :func:`fastgim.explain` with ``head_mask`` = the circuit (the other
    heads are gated to 0 in the fused attention op), signed GIM scores of how each input token drives
    the summary through the facilitating heads only.

    ``method="grad_norm"``: inteprelens' method, the L2 norm of the plain gradient of the summary's
    cross-entropy with respect to each input embedding (same gating), with inteprelens' tokenisation
    (summary as given, no leading space) and sentence spans (:func:`fastgim.sentence_spans.get_sentence_token_spans`),
    normalised by the largest score. Norms are unsigned, so this cannot tell helping from hurting tokens.

    ``enable_gradient_checkpointing`` is accepted for compatibility and ignored: fastgim does not
    change the model's settings (checkpointing does not change the values).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, enable_gradient_checkpointing: bool = True,
                 method: Literal["gim", "grad_norm"] = "gim", **gim_kwargs: Any):
        if method not in ("gim", "grad_norm"):
            raise ValueError(f"method must be 'gim' (GIM attribution) or 'grad_norm' (inteprelens), got {method!r}")
        if method == "grad_norm" and gim_kwargs:
            raise ValueError(f"GIM options {sorted(gim_kwargs)} do not apply to method='grad_norm'")
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.gim_kwargs = gim_kwargs
        num_layers, num_heads = _head_counts(model)
        self.mask_shape = (num_layers, num_heads)
        del enable_gradient_checkpointing  # attribution needs no weight gradients; kept for API compatibility

    @property
    def device(self) -> torch.device:
        return _model_device(self.model)

    def _check_mask(self, facilitating_mask: Tensor) -> Tensor:
        mask = facilitating_mask.detach().float()
        if tuple(mask.shape) != self.mask_shape:
            raise ValueError(f"facilitating_mask must be (num_layers, num_heads) = {self.mask_shape}, "
                             f"got {tuple(mask.shape)}")
        return mask.to(self.device)

    def _embedding_grad_norms(self, ids: Tensor, input_len: int, mask: Tensor,
                              loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
        embeds = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with no_parameter_grads(self.model), CHG(self.model).gating(mask.unsqueeze(0)):
            loss = loss_fn(self.model(inputs_embeds=embeds).logits)
        loss.backward()
        return embeds.grad[0, :input_len].norm(dim=-1).detach()

    def compute_token_gradients(self, input_ids: Tensor, target_ids: Tensor, facilitating_mask: Tensor) -> Tensor:
        """inteprelens' single-token gradient norms: ``(seq_len,)`` L2 norms of d(-log p(first target token))/d embedding.

        ``input_ids (1, seq_len)``, ``target_ids (1, target_len)``; the circuit gates the other heads off.
        """
        ids = input_ids.to(self.device)
        first = int(target_ids.flatten()[0])
        return self._embedding_grad_norms(ids, ids.shape[1], self._check_mask(facilitating_mask),
                                          lambda logits: -F.log_softmax(logits[0, -1], dim=-1)[first])

    def compute_token_gradients_full_target(self, input_ids: Tensor, target_ids: Tensor, facilitating_mask: Tensor
                                            ) -> Tensor:
        """inteprelens' full-summary gradient norms: ``(seq_len,)`` L2 norms of d(mean target CE)/d embedding.

        The model reads document then summary (teacher forcing); ``input_ids (1, seq_len)``,
        ``target_ids (1, target_len)``.
        """
        input_ids, target_ids = input_ids.to(self.device), target_ids.to(self.device)
        n, t = input_ids.shape[1], target_ids.shape[1]
        return self._embedding_grad_norms(
            torch.cat([input_ids, target_ids], dim=1), n, self._check_mask(facilitating_mask),
            lambda logits: F.cross_entropy(logits[0, n - 1:n + t - 1], target_ids[0], reduction="mean"))

    def _grad_norm_sentence_importance(self, document: str, sentences: list[str], summary: str,
                                       facilitating_mask: Tensor, spans: list[tuple[int, int]] | None,
                                       use_full_target: bool, aggregation: str, max_input_tokens: int | None,
                                       max_target_tokens: int | None) -> Tensor:
        from fastgim.sentence_spans import aggregate_to_sentences, get_sentence_token_spans

        def encode(text: str, special: bool, limit: int | None) -> Tensor:
            return self.tokenizer(text, add_special_tokens=special, truncation=limit is not None, max_length=limit,
                                  return_tensors="pt")["input_ids"]

        input_ids, target_ids = encode(document, True, max_input_tokens), encode(summary, False, max_target_tokens)
        if target_ids.shape[1] == 0:
            raise ValueError(f"summary {summary!r} tokenizes to nothing; give a non-empty summary")
        if spans is None:
            spans = get_sentence_token_spans(document, sentences, self.tokenizer, add_special_tokens=True)
        gradients = self.compute_token_gradients_full_target if use_full_target else self.compute_token_gradients
        scores = aggregate_to_sentences(gradients(input_ids, target_ids, facilitating_mask), spans, aggregation)
        finite = torch.isfinite(scores)
        if finite.any() and scores[finite].max() > 0:
            scores = scores / scores[finite].max()
        return scores.float().cpu()

    def compute_token_scores(self, input_ids: Tensor, target_ids: Tensor, facilitating_mask: Tensor,
                             use_full_target: bool = True) -> Tensor:
        """GIM attribution ``(len(input_ids),)`` float32 of the summary tokens given the document.

        The explained score is the summary's log-likelihood (teacher forced: the model reads the
        document then the summary) with ``use_full_target``, else the log-probability of the first
        summary token after the document.
        """
        from fastgim.explain import explain

        mask = facilitating_mask.detach().float()
        if tuple(mask.shape) != self.mask_shape:
            raise ValueError(f"facilitating_mask must be (num_layers, num_heads) = {self.mask_shape}, "
                             f"got {tuple(mask.shape)}")
        device = _model_device(self.model)
        input_ids, target_ids = input_ids.flatten().to(device), target_ids.flatten().to(device)
        doc_len = input_ids.numel()
        if not use_full_target:
            target_ids = target_ids[:1]
        ids = torch.cat([input_ids, target_ids[:-1]])
        positions = torch.arange(doc_len - 1, ids.numel(), device=device)

        def summary_logp(outputs: Any) -> Tensor:
            logp = outputs.logits[:, positions].float().log_softmax(-1)
            return logp.gather(-1, target_ids.view(1, -1, 1).expand(logp.shape[0], -1, 1)).sum(dim=(1, 2))

        scores = explain(self.model, ids, target=summary_logp, tokenizer=self.tokenizer, head_mask=mask.to(device),
                         **self.gim_kwargs)
        return scores.detach().float().cpu().flatten()[:doc_len]

    def compute_sentence_importance(
        self,
        document: str,
        sentences: list[str],
        summary: str,
        facilitating_mask: Tensor,
        spans: list[tuple[int, int]] | None = None,
        use_full_target: bool = True,
        aggregation: str = "mean",
        max_input_tokens: int | None = None,
        max_target_tokens: int | None = None,
        oom_retry_fast: bool = True,
        normalize: bool = True,
    ) -> Tensor:
        """Importance of each sentence of ``document`` for producing ``summary``, ``(num_sentences,)`` float32.

        With ``method="grad_norm"`` the scores are inteprelens' (see the class docstring; ``normalize``
        does not apply, ``oom_retry_fast`` retries an out-of-memory full-summary pass with the first
        summary token only). The rest of this paragraph describes ``method="gim"``.

        Token scores (:meth:`compute_token_scores`) are aggregated per sentence (``"mean"``, ``"sum"``
        or ``"max"``) over the tokens located via character offsets (or the given ``spans``: one
        ``[start, end)`` token range per sentence, indices into the tokenised document). With ``normalize`` the scores are divided by the largest absolute
        score. A sentence with no token left (truncation) gets NaN.
        """
        if aggregation not in ("mean", "sum", "max"):
            raise ValueError(f"aggregation must be 'mean', 'sum' or 'max', got {aggregation!r}")
        if not sentences:
            raise ValueError("sentences is empty; give the document's sentences")
        if self.method == "grad_norm":
            args = (document, sentences, summary, facilitating_mask, spans)
            limits = (aggregation, max_input_tokens, max_target_tokens)
            try:
                return self._grad_norm_sentence_importance(*args, use_full_target, *limits)
            except torch.OutOfMemoryError:
                if not (oom_retry_fast and use_full_target):
                    raise
                return self._grad_norm_sentence_importance(*args, False, *limits)
        input_ids, members = sentence_token_spans(document, sentences, self.tokenizer)
        if spans is not None:
            if len(spans) != len(sentences):
                raise ValueError(f"spans has {len(spans)} entries for {len(sentences)} sentences")
            members = [list(range(int(start), int(end))) for start, end in spans]
        if max_input_tokens is not None:
            input_ids = input_ids[:max_input_tokens]
        summary_text = summary if summary[:1].isspace() else " " + summary
        target_ids = torch.tensor(_encode(self.tokenizer, summary_text, special=False), dtype=torch.long)
        if max_target_tokens is not None:
            target_ids = target_ids[:max_target_tokens]
        if target_ids.numel() == 0:
            raise ValueError(f"summary {summary!r} tokenizes to nothing; give a non-empty summary")
        tokens = self.compute_token_scores(input_ids, target_ids, facilitating_mask, use_full_target)
        reduce = {"mean": torch.mean, "sum": torch.sum, "max": torch.max}[aggregation]
        out = torch.full((len(sentences),), float("nan"))
        for i, idx in enumerate(members):
            idx = [j for j in idx if j < tokens.numel()]
            if idx:
                out[i] = reduce(tokens[idx])
        finite = out[torch.isfinite(out)]
        if normalize and finite.numel() and finite.abs().max() > 0:
            out = out / finite.abs().max()
        return out

    def compute_sentence_importance_batch(
        self,
        documents: list[str],
        sentences_list: list[list[str]],
        summaries: list[str],
        facilitating_mask: Tensor,
        use_full_target: bool = True,
        aggregation: str = "mean",
        max_input_tokens: int | None = None,
        max_target_tokens: int | None = None,
        oom_retry_fast: bool = True,
    ) -> list[Tensor]:
        """:meth:`compute_sentence_importance` for each ``(document, sentences, summary)``, one at a time."""
        if not len(documents) == len(sentences_list) == len(summaries):
            raise ValueError(f"documents, sentences_list and summaries differ in length: {len(documents)}, "
                             f"{len(sentences_list)}, {len(summaries)}")
        return [self.compute_sentence_importance(doc, sents, summary, facilitating_mask,
                                                 use_full_target=use_full_target, aggregation=aggregation,
                                                 max_input_tokens=max_input_tokens,
                                                 max_target_tokens=max_target_tokens, oom_retry_fast=oom_retry_fast)
                for doc, sents, summary in zip(documents, sentences_list, summaries)]
