"""``inteprelens.models.adapters``: fastgim's :func:`get_adapter` / :class:`ModelAdapter`.

fastgim recognises a model by its module layout rather than its class name, so one
:class:`ModelAdapter` serves every family; the per-family classes below build it for a model and
check that the layout is the one the class names.
"""

from __future__ import annotations

from torch import nn

from fastgim.adapters import ModelAdapter, get_adapter

__all__ = ["ModelAdapter", "LlamaAdapter", "MistralAdapter", "GPT2Adapter", "GPTNeoXAdapter", "GemmaAdapter",
           "PhiAdapter", "get_adapter", "SUPPORTED_ARCHITECTURES", "ADAPTER_REGISTRY"]


class _LayoutAdapter(ModelAdapter):
    """A :class:`ModelAdapter` built as ``Adapter(model)``, for a model of the class's layout."""

    layout_name = "llama"

    def __init__(self, model: nn.Module) -> None:
        found = get_adapter(model)
        if found.layout != self.layout_name:
            raise ValueError(f"{type(self).__name__} needs a {self.layout_name}-layout model, "
                             f"{type(model).__name__} has the {found.layout} layout; use get_adapter(model)")
        super().__init__(model, found.layout, found.base)


class LlamaAdapter(_LayoutAdapter):
    """Llama layout (``model.model.layers[i].self_attn``)."""


class MistralAdapter(_LayoutAdapter):
    """Mistral / Mixtral (Llama layout)."""


class GemmaAdapter(_LayoutAdapter):
    """Gemma 1/2/3 (Llama layout)."""


class PhiAdapter(_LayoutAdapter):
    """Phi-3 (Llama layout with a fused ``qkv_proj``)."""


class GPT2Adapter(_LayoutAdapter):
    """GPT-2 layout (``model.transformer.h[i].attn``)."""

    layout_name = "gpt2"


class GPTNeoXAdapter(_LayoutAdapter):
    """GPT-NeoX / Pythia layout (``model.gpt_neox.layers[i].attention``)."""

    layout_name = "gpt_neox"


ADAPTER_REGISTRY: dict[str, type[ModelAdapter]] = {
    "LlamaForCausalLM": LlamaAdapter, "MistralForCausalLM": MistralAdapter, "MixtralForCausalLM": MistralAdapter,
    "GPT2LMHeadModel": GPT2Adapter, "GPTNeoXForCausalLM": GPTNeoXAdapter, "GemmaForCausalLM": GemmaAdapter,
    "Gemma2ForCausalLM": GemmaAdapter, "PhiForCausalLM": PhiAdapter, "Phi3ForCausalLM": PhiAdapter,
}
SUPPORTED_ARCHITECTURES = list(ADAPTER_REGISTRY)
"""inteprelens' list; fastgim's :func:`get_adapter` also takes other models with these layouts."""
