"""GIM as a Captum attribution method: :class:`LayerGIM`.

``LayerGIM(model)`` is Captum's ``LayerGradientXActivation`` whose gradients are GIM's: its
:meth:`LayerGIM.attribute` runs the forward and the backward inside :class:`fastgim.GIM`, so every
GIM rule applies (frozen norms, temperature softmax backward, Q/K/V and gated-MLP scales), with
parameter gradients switched off (activation gradients only) and, on request, per-layer activation
checkpointing for long inputs. Everything else is Captum's: targets, batching, layer selection.

With Captum's LLM wrapper::

    from captum.attr import LLMGradientAttribution, TextTokenInput
    from fastgim.integrations.captum import LayerGIM

    llm_attr = LLMGradientAttribution(LayerGIM(model), tokenizer)
    result = llm_attr.attribute(TextTokenInput(prompt, tokenizer), target=" Paris")

``result.token_attr[t, i]`` is the gradient of target token ``t``'s log-probability under GIM's
backward, times the embedding of input token ``i``, summed over the hidden dimension. GIM settings
go in as keyword arguments, e.g. ``llm_attr.attribute(inp, target=" Paris", softmax_temperature=1.5)``.

Needs the optional package ``captum`` (``pip install fastgim[captum]``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    from captum.attr import LayerGradientXActivation
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fastgim.integrations.captum needs Captum: pip install 'fastgim[captum]' (or pip install captum)"
    ) from error

from fastgim.checkpointing import checkpoint_layers
from fastgim.gim import GIM
from fastgim.params import no_parameter_grads
from fastgim.settings import (
    DEFAULT_GATE_SCALE,
    DEFAULT_K_SCALE,
    DEFAULT_Q_SCALE,
    DEFAULT_TEMPERATURE,
    DEFAULT_UP_SCALE,
    DEFAULT_V_SCALE,
)

__all__ = ["LayerGIM"]


class LayerGIM(LayerGradientXActivation):
    """Captum's layer gradient x activation with GIM's backward.

    Args:
        model: the Hugging Face model (it is both Captum's ``forward_func`` and the model GIM acts on).
        layer: the layer whose output is attributed; default ``model.get_input_embeddings()``, which
            gives GIM's token attribution (times the embedding, no baseline).
        forward_func: what Captum differentiates, a callable returning a tensor, e.g.
            ``lambda ids: model(ids).logits[:, -1]``; default the model itself (Captum's
            ``LLMGradientAttribution`` replaces it with its own log-probability function).
        device_ids, multiply_by_inputs: as in ``LayerGradientXActivation``.

    :meth:`attribute` takes Captum's arguments plus the GIM settings of :class:`fastgim.GIM` and
    ``checkpoint`` (recompute each transformer block in the backward: long inputs in less memory).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | None = None,
        forward_func: Callable[..., torch.Tensor] | None = None,
        device_ids: list[int] | None = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"LayerGIM needs the model (a torch.nn.Module), got {type(model).__name__}")
        if layer is None:
            get_embeddings = getattr(model, "get_input_embeddings", None)
            if get_embeddings is None:
                raise TypeError(
                    f"{type(model).__name__} has no get_input_embeddings(); pass the layer to attribute: "
                    "LayerGIM(model, layer=...)"
                )
            layer = get_embeddings()
        super().__init__(
            model if forward_func is None else forward_func, layer, device_ids=device_ids,
            multiply_by_inputs=multiply_by_inputs,
        )
        self.gim_model = model

    def attribute(
        self,
        inputs: Any,
        target: Any = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        *,
        freeze_norm: bool = True,
        softmax_temperature: float | None = DEFAULT_TEMPERATURE,
        q_scale: float | None = DEFAULT_Q_SCALE,
        k_scale: float | None = DEFAULT_K_SCALE,
        v_scale: float | None = DEFAULT_V_SCALE,
        gate_scale: float | None = DEFAULT_GATE_SCALE,
        up_scale: float | None = DEFAULT_UP_SCALE,
        checkpoint: bool = False,
    ) -> Any:
        """``LayerGradientXActivation.attribute`` inside ``fastgim.GIM(model, ...)``; same return value."""
        gim = GIM(
            self.gim_model, freeze_norm=freeze_norm, softmax_temperature=softmax_temperature, q_scale=q_scale,
            k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
        )
        with contextlib.ExitStack() as stack:
            stack.enter_context(gim)
            stack.enter_context(no_parameter_grads(self.gim_model))
            stack.enter_context(checkpoint_layers(self.gim_model, enabled=checkpoint))
            return super().attribute(
                inputs, target=target, additional_forward_args=additional_forward_args,
                attribute_to_layer_input=attribute_to_layer_input, grad_kwargs=grad_kwargs,
            )
