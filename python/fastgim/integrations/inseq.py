"""GIM as an inseq attribution method.

``import fastgim.integrations.inseq`` registers these methods with inseq:

* ``"gim"``: every GIM rule (:class:`fastgim.GIM` defaults);
* ``"gim_freeze_norm"``, ``"gim_temperature"``, ``"gim_qkv_scale"``, ``"gim_mlp_scale"``: one rule alone
  (the GIM paper's ablations), as ``fastgim.attribute(method=...)``.

Then ``inseq.load_model(model_or_name, "gim")`` and ``.attribute(texts, generation_args=...)`` attribute
every generated token. Each step's score of input token ``i`` is the GIM gradient of inseq's attributed
function (``attributed_fn``, e.g. ``"logit"`` or ``"probability"``) times ``embedding_i - baseline_i``,
summed over the hidden dimension: the quantity of ``fastgim.attribute(method="gim")``, with the same
baseline token (explicit ``baseline_token_id=``, else the tokenizer's space token, else pad, else unk).
The scores are signed sums, not inseq's default vector norm of granular gradients, so the output is a
:class:`inseq.data.FeatureAttributionOutput` with one score per token, which supports ``show``,
``save``, ``load`` and ``aggregate``.

GIM settings go in as keyword arguments of ``attribute``, e.g. ``softmax_temperature=1.5``.
Parameter gradients are off during attribution (activation gradients only).

Needs the optional package ``inseq`` (``pip install fastgim[inseq]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

try:
    from captum._utils.gradient import compute_gradients
    from captum.attr import GradientAttribution
    from inseq.attr.feat.attribution_utils import get_source_target_attributions
    from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry
    from inseq.data import CoarseFeatureAttributionStepOutput
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastgim.integrations.inseq needs inseq: pip install 'fastgim[inseq]' (or pip install inseq)"
    ) from error

from fastgim.attribution import _method_gim_settings, embed, resolve_baseline
from fastgim.gim import GIM
from fastgim.params import no_parameter_grads
from fastgim.pruning import target_rows_only
from fastgim.settings import GIMSettings

__all__ = ["GIMAttribution", "METHOD_NAMES"]

_UNSET: Any = object()  # a GIM setting the caller did not give (None already means "rule off")


class _GIMTimesInput(GradientAttribution):
    """Captum-style method: GIM gradient times ``(inputs - baseline embeddings)``, per hidden unit."""

    def __init__(self, attribution_model: Any, method: str) -> None:
        super().__init__(attribution_model)
        self.attribution_model = attribution_model
        self.method = method

    def attribute(
        self,
        inputs: tuple[torch.Tensor, ...],
        target: Any = None,
        additional_forward_args: tuple[Any, ...] | None = None,
        baseline_token_id: int | None = None,
        freeze_norm: Any = _UNSET,
        softmax_temperature: Any = _UNSET,
        q_scale: Any = _UNSET,
        k_scale: Any = _UNSET,
        v_scale: Any = _UNSET,
        gate_scale: Any = _UNSET,
        up_scale: Any = _UNSET,
    ) -> tuple[torch.Tensor, ...]:
        """Per-hidden-unit attributions; the GIM settings left unset keep the method's defaults."""
        given = dict(
            freeze_norm=freeze_norm, softmax_temperature=softmax_temperature, q_scale=q_scale, k_scale=k_scale,
            v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
        )
        hf_model = self.attribution_model.model
        settings = _method_settings(self.method, {k: v for k, v in given.items() if v is not _UNSET})
        with contextlib.ExitStack() as stack:
            stack.enter_context(GIM(hf_model, **dataclasses.asdict(settings)))
            stack.enter_context(no_parameter_grads(hf_model))
            stack.enter_context(self._last_row_only(inputs[0], additional_forward_args))
            grads = compute_gradients(self.forward_func, inputs, target, additional_forward_args)
        input_ids = additional_forward_args[0]
        baseline_id = resolve_baseline(baseline_token_id, self.attribution_model.tokenizer, hf_model)
        return tuple(g * (x - _baseline_embeds(hf_model, input_ids, baseline_id, x)) for g, x in zip(grads, inputs))


    def _last_row_only(self, embeds: torch.Tensor, forward_args: tuple[Any, ...] | None):
        """fastgim's last-block pruning (as ``fastgim.attribute``): a decoder-only step reads the last row only."""
        mask = forward_args[3] if forward_args is not None and len(forward_args) > 3 else None
        last_is_real = mask is None or bool(torch.as_tensor(mask)[:, -1].all())
        if self.attribution_model.is_encoder_decoder or not last_is_real:
            return contextlib.nullcontext()
        seq_len = embeds.shape[1]
        return target_rows_only(self.attribution_model.model, torch.tensor([seq_len - 1]), seq_len)


def _method_settings(method: str, overrides: dict[str, Any]) -> GIMSettings:
    gim_kwargs = {**dataclasses.asdict(GIMSettings()), **overrides}
    return _method_gim_settings(method, False, gim_kwargs)


def _baseline_embeds(model: torch.nn.Module, ids: torch.Tensor, baseline_id: int | None, like: torch.Tensor):
    if baseline_id is None or ids is None or ids.shape != like.shape[:2]:
        return torch.zeros_like(like)
    with torch.no_grad():
        return embed(model, torch.full_like(ids, baseline_id)).to(like.dtype)


class GIMAttribution(GradientAttributionRegistry):
    """inseq method ``"gim"``: GIM gradient x (input - baseline) embeddings, summed over the hidden dimension."""

    method_name = "gim"

    def __init__(self, attribution_model: Any, **kwargs: Any) -> None:
        super().__init__(attribution_model, **kwargs)
        self.method = _GIMTimesInput(self.attribution_model, self.method_name)

    def attribute_step(
        self, attribute_fn_main_args: dict[str, Any], attribution_args: dict[str, Any] | None = None
    ) -> CoarseFeatureAttributionStepOutput:
        attr = self.method.attribute(**attribute_fn_main_args, **(attribution_args or {}))
        summed = tuple(a.sum(-1) for a in attr)
        source, target = get_source_target_attributions(summed, self.attribution_model.is_encoder_decoder)
        return CoarseFeatureAttributionStepOutput(source_attributions=source, target_attributions=target)


def _ablation(rule_method: str) -> type[GIMAttribution]:
    doc = f"inseq method ``{rule_method!r}``: one GIM rule alone (see ``fastgim.attribute``)."
    return type(f"GIM_{rule_method}", (GIMAttribution,), {"method_name": rule_method, "__doc__": doc})


_ABLATIONS = tuple(_ablation(name) for name in ("gim_freeze_norm", "gim_temperature", "gim_qkv_scale", "gim_mlp_scale"))

#: The inseq method names this module registers.
METHOD_NAMES = (GIMAttribution.method_name, *(cls.method_name for cls in _ABLATIONS))
