"""Model adapters (inteprelens' ``get_adapter``): uniform access to a decoder's parts.

``get_adapter(model)`` recognises a Hugging Face causal LM by its module layout and
returns a :class:`ModelAdapter` with ``get_layers()``, ``get_attention_module(i)``,
``get_o_proj(i)``, ``get_mlp(i)``, ``get_final_norm()``, ``get_lm_head()`` (``i`` an index or the
layer module; inteprelens' names ``get_attention_output_proj``, ``get_pre_attention_norm`` and
``get_pre_mlp_norm`` are aliases of ``get_o_proj``, ``get_attn_norm`` and ``get_mlp_norm``) and the
pieces circuit attribution needs (per-head Q/K/V projections, the norms in front
of attention and MLP, head counts). Layouts covered:

* ``llama``: ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` + ``mlp`` (Llama,
  Mistral, Mixtral, Qwen2/3 incl. MoE, Gemma 1/2/3, OLMo/OLMo2, Phi-3 with its fused
  ``qkv_proj``, and other models laid out the same way);
* ``gpt2``: ``model.transformer.h[i].attn.{c_attn,c_proj}`` + ``mlp``;
* ``gpt_neox``: ``model.gpt_neox.layers[i].attention.{query_key_value,dense}`` + ``mlp``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ModelAdapter", "get_adapter", "find_layout", "SUPPORTED_LAYOUTS"]

SUPPORTED_LAYOUTS = ("llama", "gpt2", "gpt_neox")


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight as ``(out_features, in_features)`` for nn.Linear and GPT-2's Conv1D."""
    weight = module.weight
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D stores (in, out)
        return weight.t()
    return weight


class ModelAdapter:
    """Uniform access to the parts of one decoder-only model (see module docstring).

    ``ModelAdapter(model)`` finds the layout of a known model itself (as :func:`get_adapter`);
    ``layout`` / ``base`` may be given explicitly. inteprelens-style custom adapters subclass it::

        class MyAdapter(ModelAdapter):
            def __init__(self, model):
                super().__init__(model)

            def get_layers(self):
                return self.model.backbone.blocks

            def get_attention_output_proj(self, layer):
                return self._resolve_layer(layer).attn.out

    Such a subclass may wrap a model of no known layout; it must then override ``get_layers`` and
    ``get_attention_output_proj`` (the two methods CHG's hook gate needs, as inteprelens' abstract ones).
    fastgim's own method names (``get_o_proj``, ``get_attn_norm``, ``get_mlp_norm``) call inteprelens'
    names, so an override of either spelling is seen by fastgim.
    """

    def __init__(self, model: nn.Module, layout: str | None = None, base: nn.Module | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelAdapter expects a torch model (nn.Module), got {type(model).__name__}")
        if layout is None:
            found = find_layout(model)
            layout, base = found if found is not None else (None, None)
        elif layout not in SUPPORTED_LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(SUPPORTED_LAYOUTS)}")
        elif base is None:
            raise ValueError(f"layout {layout!r} needs the base module (the one holding the layers)")
        self.model, self.layout, self.base = model, layout, base
        if layout is None and not self._overrides_structure():
            raise ValueError(_unknown_layout_message(model) + "; or subclass ModelAdapter and override get_layers "
                             "and get_attention_output_proj")

    def _overrides_structure(self) -> bool:
        cls = type(self)
        projection = (cls.get_attention_output_proj is not ModelAdapter.get_attention_output_proj
                      or cls.get_o_proj is not ModelAdapter.get_o_proj)
        return cls.get_layers is not ModelAdapter.get_layers and projection

    def _need_layout(self, method: str) -> str:
        if self.layout is None:
            raise NotImplementedError(f"{type(self).__name__}.{method}: {type(self.model).__name__} has no layout "
                                      f"fastgim knows; override {method} in the adapter")
        return self.layout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__}, layout={self.layout!r})"

    # -- structure -------------------------------------------------------------------------------
    def get_layers(self) -> nn.ModuleList:
        """The decoder layers (``nn.ModuleList``), in order."""
        layout = self._need_layout("get_layers")
        return self.base.h if layout == "gpt2" else self.base.layers

    @property
    def num_layers(self) -> int:
        return len(self.get_layers())

    @property
    def config(self):
        return self.model.config

    @property
    def num_heads(self) -> int:
        config = self.config
        value = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        if not value:
            raise AttributeError(f"{type(config).__name__} has no num_attention_heads; override num_heads in "
                                 f"{type(self).__name__}")
        return int(value)

    @property
    def num_kv_heads(self) -> int:
        value = getattr(self.config, "num_key_value_heads", None)
        return self.num_heads if value is None else int(value)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def head_dim(self) -> int:
        """The config's explicit ``head_dim`` when set (Gemma 2, Qwen3...), else ``hidden_size // num_heads``."""
        value = getattr(self.config, "head_dim", None)
        return int(value) if value else self.hidden_size // self.num_heads

    @property
    def parallel_residual(self) -> bool:
        """True when attention and MLP both read the layer input (GPT-NeoX style)."""
        return self.layout == "gpt_neox" and bool(getattr(self.config, "use_parallel_residual", True))

    @property
    def linear_residual_writes(self) -> bool:
        """True when head outputs enter the residual stream through ``o_proj`` alone.

        False for post-norm layouts (Gemma 2/3, OLMo2) where a norm sits between
        ``o_proj`` and the residual add; edge attribution needs True.
        """
        layer = self.get_layers()[0]
        return not hasattr(layer, "post_feedforward_layernorm")

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter."""
        return next(self.model.parameters()).device

    def _check_index(self, i: int) -> None:
        if not -self.num_layers <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range for a model with {self.num_layers} layers")

    def _resolve_layer(self, layer: int | nn.Module) -> nn.Module:
        """The decoder layer for an index or a layer module (inteprelens accepts both)."""
        if isinstance(layer, nn.Module):
            return layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int index or a decoder layer module, got {type(layer).__name__}")
        self._check_index(layer)
        return self.get_layers()[layer]

    def get_attention_module(self, layer: int | nn.Module) -> nn.Module:
        """The attention module of ``layer`` (an index or the layer module)."""
        layout = self._need_layout("get_attention_module")
        block = self._resolve_layer(layer)
        return {"llama": lambda: block.self_attn, "gpt2": lambda: block.attn, "gpt_neox": lambda: block.attention}[
            layout
        ]()

    def get_attention_output_proj(self, layer: int | nn.Module) -> nn.Module:
        """The attention output projection of ``layer``; its input is ``(B, L, Hq * head_dim)``."""
        layout = self._need_layout("get_attention_output_proj")
        attn = self.get_attention_module(layer)
        return {"llama": lambda: attn.o_proj, "gpt2": lambda: attn.c_proj, "gpt_neox": lambda: attn.dense}[layout]()

    def get_o_proj(self, layer: int | nn.Module) -> nn.Module:
        """fastgim's name of :meth:`get_attention_output_proj`."""
        return self.get_attention_output_proj(layer)

    def get_mlp(self, layer: int | nn.Module) -> nn.Module:
        """The MLP (or MoE block) of ``layer``."""
        return self._resolve_layer(layer).mlp

    def get_pre_attention_norm(self, layer: int | nn.Module) -> nn.Module | None:
        """The norm in front of attention in ``layer`` (None for post-norm layouts)."""
        layout = self._need_layout("get_pre_attention_norm")
        block = self._resolve_layer(layer)
        return getattr(block, "ln_1", None) if layout == "gpt2" else getattr(block, "input_layernorm", None)

    def get_attn_norm(self, layer: int | nn.Module) -> nn.Module | None:
        """fastgim's name of :meth:`get_pre_attention_norm`."""
        return self.get_pre_attention_norm(layer)

    def get_mlp_norm(self, layer: int | nn.Module) -> nn.Module | None:
        """fastgim's name of :meth:`get_pre_mlp_norm`."""
        return self.get_pre_mlp_norm(layer)

    def get_pre_mlp_norm(self, layer: int | nn.Module) -> nn.Module | None:
        """The norm in front of the MLP in ``layer`` (None for post-norm layouts)."""
        layout = self._need_layout("get_pre_mlp_norm")
        layer = self._resolve_layer(layer)
        if layout == "gpt2":
            return layer.ln_2
        if hasattr(layer, "pre_feedforward_layernorm"):
            return layer.pre_feedforward_layernorm
        if hasattr(layer, "post_feedforward_layernorm"):  # OLMo2: post-norm only
            return None
        return getattr(layer, "post_attention_layernorm", None)

    def post_attention_anchor(self, layer: int | nn.Module) -> nn.Module:
        """The module whose input is the residual stream right after attention (the pre-MLP norm).

        Raises for parallel-residual (GPT-NeoX) and post-norm-only layouts, which have no such point.
        """
        if self.parallel_residual:
            raise ValueError("post_attn_residual does not exist on a parallel-residual (GPT-NeoX) layer: "
                             "attention and MLP both read block_input")
        norm = self.get_mlp_norm(layer)
        if norm is None:
            raise ValueError(f"{type(self.model).__name__} has no pre-MLP norm, so no post_attn_residual site; "
                             "trace block_input / attn_output instead")
        return norm

    def get_final_norm(self) -> nn.Module:
        """The final norm before the LM head."""
        self._need_layout("get_final_norm")
        return {"llama": lambda: self.base.norm, "gpt2": lambda: self.base.ln_f,
                "gpt_neox": lambda: self.base.final_layer_norm}[self.layout]()

    def get_lm_head(self) -> nn.Module:
        """The LM head (``get_output_embeddings()``)."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no LM head; load it with AutoModelForCausalLM")
        return head

    def get_embedding(self) -> nn.Module:
        """The token embedding module (``get_input_embeddings()``)."""
        return self.model.get_input_embeddings()

    # -- per-head projections --------------------------------------------------------------------
    def qkv_modules(self, i: int) -> list[tuple[nn.Module, str]]:
        """Modules whose outputs are Q, K, V of layer ``i`` with their layout tag.

        Tags: ``"q"``, ``"k"``, ``"v"`` (separate projections), ``"qkv"`` (one output
        ``[q | k | v]``), ``"neox"`` (one output interleaved per head as ``(H, 3, D)``).
        """
        attn = self.get_attention_module(i)
        if self.layout == "gpt2":
            return [(attn.c_attn, "qkv")]
        if self.layout == "gpt_neox":
            return [(attn.query_key_value, "neox")]
        if hasattr(attn, "qkv_proj"):
            return [(attn.qkv_proj, "qkv")]
        return [(attn.q_proj, "q"), (attn.k_proj, "k"), (attn.v_proj, "v")]

    def split_qkv(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split captured projection outputs (keyed by tag) into per-head Q, K, V.

        Returns ``q (..., Hq, D)``, ``k (..., Hkv, D)``, ``v (..., Hkv, D)``.
        """
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if "q" in outputs:
            q, k, v = outputs["q"], outputs["k"], outputs["v"]
        elif "qkv" in outputs:
            q, k, v = outputs["qkv"].split([hq * d, hkv * d, hkv * d], dim=-1)
        else:
            x = outputs["neox"].unflatten(-1, (hq, 3 * d))
            q, k, v = x[..., :d], x[..., d : 2 * d], x[..., 2 * d :]
            return q, k, v
        return q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))

    def qkv_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head projection weights ``(Hq, D, hidden)``, ``(Hkv, D, hidden)``, ``(Hkv, D, hidden)``."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        mods = self.qkv_modules(i)
        if len(mods) == 3:
            wq, wk, wv = (_linear_weight(m) for m, _ in mods)
        elif mods[0][1] == "qkv":
            wq, wk, wv = _linear_weight(mods[0][0]).split([hq * d, hkv * d, hkv * d], dim=0)
        else:
            w = _linear_weight(mods[0][0]).unflatten(0, (hq, 3 * d))
            return w[:, :d], w[:, d : 2 * d], w[:, 2 * d :]
        return wq.unflatten(0, (hq, d)), wk.unflatten(0, (hkv, d)), wv.unflatten(0, (hkv, d))

    def o_proj_weight(self, i: int) -> torch.Tensor:
        """Output projection weight per head: ``(Hq, hidden, D)``."""
        w = _linear_weight(self.get_o_proj(i))  # (hidden, Hq * D)
        return w.unflatten(1, (self.num_heads, self.head_dim)).permute(1, 0, 2)


def find_layout(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(layout, base)`` of a known decoder layout (``base`` holds the layers), None for an unknown one."""
    candidates = [model, getattr(model, "model", None), getattr(model, "transformer", None),
                  getattr(model, "gpt_neox", None)]
    for base in candidates:
        if not isinstance(base, nn.Module):
            continue
        layers = getattr(base, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return "llama", base
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "attention"):
            return "gpt_neox", base
        h = getattr(base, "h", None)
        if isinstance(h, nn.ModuleList) and len(h) and hasattr(h[0], "attn") and hasattr(h[0].attn, "c_attn"):
            return "gpt2", base
    return None


def _unknown_layout_message(model: nn.Module) -> str:
    return (f"no adapter for {type(model).__name__}: supported layouts are {', '.join(SUPPORTED_LAYOUTS)} "
            "(model.model.layers[i].self_attn, model.transformer.h[i].attn, model.gpt_neox.layers[i].attention)")


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Adapter for a Hugging Face causal LM (or its base model); raises for unknown layouts."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_adapter expects a transformers model, got {type(model).__name__}")
    found = find_layout(model)
    if found is None:
        raise ValueError(_unknown_layout_message(model))
    return ModelAdapter(model, *found)
