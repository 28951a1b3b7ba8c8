"""An independent GIM reference for the tests: eager maths with explicit autograd per rule.

Nothing here uses fastgim's attention op, norm ops or patching. The rules are written out:

* attention: a test-registered ``"gim_reference"`` implementation (eager attention on an additive
  mask from transformers' ``eager_mask``) whose softmax is :class:`TemperatureSoftmax` (forward
  ``softmax(S)``, backward with ``softmax(S / T)``) and whose q / k / v pass through
  :class:`GradScale`;
* norms: instance forwards with the statistic detached (RMS: ``rsqrt(mean(x^2) + eps)``;
  LayerNorm: the std, keeping the mean), one per casting convention;
* gated MLPs: tensor hooks on the gate / up projection outputs (``register_hook``), and for MoE
  experts an explicit re-implementation of the eager experts loop with the same hooks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

REFERENCE_IMPL = "gim_reference"


class TemperatureSoftmax(torch.autograd.Function):
    """Softmax over the last dim; the backward uses ``softmax(S / T)`` in place of ``softmax(S)``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return torch.softmax(scores, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scores,) = ctx.saved_tensors
        p_t = torch.softmax(scores / ctx.temperature, dim=-1)
        return p_t * (grad - (grad * p_t).sum(-1, keepdim=True)), None


class GradScale(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


_SETTINGS: dict[str, float] = {}


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                         **kwargs):
    s = _SETTINGS
    groups = query.shape[1] // key.shape[1]
    query = GradScale.apply(query, s.get("q_scale", 1.0))
    key = GradScale.apply(key, s.get("k_scale", 1.0))
    value = GradScale.apply(value, s.get("v_scale", 1.0))
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].to(scores.dtype)
    probs = TemperatureSoftmax.apply(scores, s.get("temperature", 1.0))
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE_IMPL, _reference_attention)
AttentionMaskInterface.register(REFERENCE_IMPL, eager_mask)


# --------------------------------------------------------------------------- norms


def _rms_forward(module: nn.Module, cast: str, offset: float, eps: float):
    def forward(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).detach()
        normed = x32 * rstd
        if cast == "llama":
            return module.weight * normed.to(x.dtype)
        weight = offset + module.weight.float() if cast == "gemma" else module.weight
        return (normed * weight).to(x.dtype)

    return forward


def _layer_norm_forward(module: nn.LayerNorm):
    def forward(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps).detach()
        out = centred / std
        if module.weight is not None:
            out = out * module.weight
        if module.bias is not None:
            out = out + module.bias
        return out

    return forward


def _reference_norm(module: nn.Module):
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        return _layer_norm_forward(module)
    if name in ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"):
        return _rms_forward(module, "gemma", 1.0, module.eps)
    if name == "Olmo2RMSNorm":
        return _rms_forward(module, "olmo2", 0.0, module.variance_epsilon)
    if name.endswith("RMSNorm"):
        return _rms_forward(module, "llama", 0.0, module.variance_epsilon)
    return None


# --------------------------------------------------------------------------- gated MLPs


def _scale_output(scale: float):
    def hook(_module, _inputs, output):
        if output.requires_grad:
            output.register_hook(lambda g: g * scale)

    return hook


def _scale_halves(gate_scale: float, up_scale: float):
    def hook(_module, _inputs, output):
        if output.requires_grad:
            half = output.shape[-1] // 2
            factor = torch.cat([output.new_full((half,), gate_scale), output.new_full((half,), up_scale)])
            output.register_hook(lambda g: g * factor)

    return hook


def _experts_forward(module: nn.Module, gate_scale: float, up_scale: float):
    """The eager experts loop written out, with the gate / up gradients scaled by tensor hooks."""

    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(module.num_experts):
            token_idx, slot = torch.where(top_k_index == expert)
            if token_idx.numel() == 0:
                continue
            gate_up = F.linear(hidden_states[token_idx], module.gate_up_proj[expert])
            gate, up = gate_up.chunk(2, dim=-1)
            gate, up = gate * 1.0, up * 1.0
            if gate.requires_grad:
                gate.register_hook(lambda g: g * gate_scale)
                up.register_hook(lambda g: g * up_scale)
            h = F.linear(module.act_fn(gate) * up, module.down_proj[expert])
            out.index_add_(0, token_idx, h * top_k_weights[token_idx, slot, None])
        return out

    return forward


@contextlib.contextmanager
def reference_gim(model: nn.Module, *, freeze_norm=True, softmax_temperature=2.0, q_scale=0.25, k_scale=0.25,
                  v_scale=0.5, gate_scale=0.5, up_scale=0.5):
    """Apply the reference GIM rules to ``model`` for the block (attention switched to ``gim_reference``)."""
    _SETTINGS.clear()
    _SETTINGS.update(temperature=softmax_temperature or 1.0, q_scale=1.0 if q_scale is None else q_scale,
                     k_scale=1.0 if k_scale is None else k_scale, v_scale=1.0 if v_scale is None else v_scale)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE_IMPL)
    handles, patched = [], []
    gs = 1.0 if gate_scale is None else gate_scale
    us = 1.0 if up_scale is None else up_scale
    try:
        for module in model.modules():
            forward = _reference_norm(module) if freeze_norm else None
            if forward is not None:
                module.forward = forward
                patched.append(module)
            if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):  # always: eager loop, any dtype
                module.forward = _experts_forward(module, gs, us)
                patched.append(module)
            if gate_scale is None and up_scale is None:
                continue
            if isinstance(getattr(module, "gate_proj", None), nn.Linear):
                handles.append(module.gate_proj.register_forward_hook(_scale_output(gs)))
                handles.append(module.up_proj.register_forward_hook(_scale_output(us)))
            elif isinstance(getattr(module, "gate_up_proj", None), nn.Linear):
                handles.append(module.gate_up_proj.register_forward_hook(_scale_halves(gs, us)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward
        model.set_attn_implementation(previous)


def reference_explain(model: nn.Module, input_ids: torch.Tensor, *, baseline_token_id: int,
                      attention_mask: torch.Tensor | None = None, target_token_id=None, contrast_token_id=None,
                      target_position: int = -1, target=None, **settings) -> torch.Tensor:
    """Attributions ``[batch, seq]`` by the reference rules; per-row loop, no batching tricks."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(ids.shape)
    embed = model.get_input_embeddings()
    result = torch.zeros(ids.shape, dtype=torch.float64)
    with reference_gim(model, **settings):
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            row_ids = ids[row][real][None]  # each row alone, without its padding
            emb = embed(row_ids).detach().requires_grad_(True)
            base = embed(torch.full_like(row_ids, baseline_token_id)).detach()
            outputs = model(inputs_embeds=emb)
            if target is not None:
                score = target(outputs)[0]
            else:
                logits = outputs.logits[0, target_position]
                tid = _pick(target_token_id, row)
                tid = int(logits.argmax()) if tid is None else tid
                score = logits[tid]
                cid = _pick(contrast_token_id, row)
                if cid is not None:
                    score = score - logits[cid]
            (grad,) = torch.autograd.grad(score, emb)
            result[row, real] = (grad.double() * (emb.double() - base.double())).sum(-1)[0]
    return result


def _pick(value, row: int):
    if value is None:
        return None
    if isinstance(value, int):
        return value
    return int(value[row])


# --------------------------------------------------------------------------- tiny families

VOCAB = 128


def _common(**extra):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    base.update(extra)
    return base


def family_config(family: str):
    """``(model class, config)`` of a tiny random model of ``family``."""
    import transformers as t

    table = {
        "llama": (t.LlamaForCausalLM, t.LlamaConfig, {}),
        "mistral": (t.MistralForCausalLM, t.MistralConfig, {"sliding_window": 5}),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config, {}),
        "qwen3": (t.Qwen3ForCausalLM, t.Qwen3Config, {"head_dim": 8}),
        "gemma": (t.GemmaForCausalLM, t.GemmaConfig, {"head_dim": 8}),
        "gemma2": (t.Gemma2ForCausalLM, t.Gemma2Config, {"head_dim": 8, "sliding_window": 4,
                                                         "attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 8}),
        "gemma3": (t.Gemma3ForCausalLM, t.Gemma3TextConfig, {"head_dim": 8, "sliding_window": 4,
                                                             "query_pre_attn_scalar": 8}),
        "phi3": (t.Phi3ForCausalLM, t.Phi3Config, {}),
        "olmo2": (t.Olmo2ForCausalLM, t.Olmo2Config, {}),
        "mixtral": (t.MixtralForCausalLM, t.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
        "qwen2_moe": (t.Qwen2MoeForCausalLM, t.Qwen2MoeConfig, {"num_experts": 4, "num_experts_per_tok": 2,
                                                                "moe_intermediate_size": 24,
                                                                "shared_expert_intermediate_size": 40}),
    }
    if family in table:
        cls, cfg_cls, extra = table[family]
        return cls, cfg_cls(**_common(**extra))
    if family == "gpt2":
        return t.GPT2LMHeadModel, t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               bos_token_id=1, eos_token_id=2)
    if family == "gptj":  # partial rotary (rotary_dim < head_dim), parallel attention and MLP
        return t.GPTJForCausalLM, t.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                               n_positions=64, bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return t.GPTNeoXForCausalLM, t.GPTNeoXConfig(**_common(num_key_value_heads=4, intermediate_size=64))
    if family == "bert":
        return t.BertForMaskedLM, t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=48,
                                               max_position_embeddings=64, pad_token_id=0)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gptj", "gpt_neox",
            "olmo2", "bert", "mixtral", "qwen2_moe")


def routes_through_attention_interface(family: str) -> bool:
    """Whether the installed transformers runs ``family``'s attention through ``AttentionInterface`` (GPT-J:
    from transformers 5.2x on; before, it is one of the families fastgim refuses)."""
    cls, _ = family_config(family)
    return bool(getattr(cls, "_supports_attention_backend", False))


def build_model(family: str, *, seed: int = 0, sharpen: float = 15.0, sharpen_norm: float = 2.0,
                attn: str = "eager") -> nn.Module:
    """A tiny random ``family`` model in eval mode, float32, with sharp attention.

    q / k projection weights are multiplied by ``sharpen`` (scores of order 3 instead of 0.01 with the
    0.02-std init) and q_norm / k_norm effective weights by ``sharpen_norm``, so that the softmax
    temperature visibly changes gradients.
    """
    cls, config = family_config(family)
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "hidden_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 2)
            if leaf[-1] == "bias" and param.dim() == 1:
                param.normal_(0.0, 0.02)  # non-zero biases
            elif "norm" in name.lower() and param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)  # non-trivial norm weights
            owner = leaf[-2] if len(leaf) > 1 else ""
            if owner in ("q_proj", "k_proj", "qkv_proj", "c_attn", "query_key_value", "query", "key") and leaf[-1] == "weight":
                param.mul_(sharpen)
            if owner in ("q_norm", "k_norm") and leaf[-1] == "weight":
                offset = 1.0 if "Gemma" in type(model).__name__ else 0.0
                param.copy_((param + offset) * sharpen_norm - offset)
    return model
