"""End-to-end attribution of one prompt: ``fastgim.explain`` vs the alternatives, time and peak memory.

Methods (all explain the same logit, token ``TARGET`` at the last position, against baseline token 0):

* ``fastgim``: ``fastgim.explain`` (every GIM rule, ``gim_fused`` attention);
* ``fastgim-checkpoint``: the same with per-layer activation checkpointing (recompute in the backward);
* ``grad-x-input``: plain gradient x input on SDPA attention, parameters' gradients off: the floor;
* ``gim-explain``: ``gim.explain`` from gim-explain 0.1.4 as published (SDPA, its default; it leaves the
  parameters' ``requires_grad`` as they are, so it also computes weight gradients);
* ``naive-gim``: a naive but correct GIM written here: eager attention with materialised scores, a
  temperature-softmax backward and Q/K/V gradient scales, frozen RMSNorm statistics and halved gate / up
  gradients (hooks). Llama-family models only.

CPU: a 2-layer Llama (hidden 128, 4 / 2 heads), fp32, N = 128, 512, 1024.
GPU (``--gpu``): the Llama-3.1-8B shape (32 layers, hidden 4096, 32 heads, 8 KV heads, intermediate
14336, vocab 128256), random weights, bf16, N = 1k, 4k, 16k, 32k. Out-of-memory runs are results.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import fastgim
from fastgim.checkpointing import checkpoint_layers

SUITE = "explain"
LENGTHS = {"cpu": (128, 512, 1024), "gpu": (1024, 4096, 16384, 32768)}
MODELS = {
    "cpu": ({"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}, torch.float32),
    "gpu": ({"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}, torch.bfloat16),
}
TARGET, BASELINE = 7, 0
TEMPERATURE, Q_SCALE, K_SCALE, V_SCALE, GATE_SCALE, UP_SCALE = 2.0, 0.25, 0.25, 0.5, 0.5, 0.5
METHODS = ("fastgim", "fastgim-checkpoint", "grad-x-input", "gim-explain", "naive-gim")
NAIVE_IMPL = "fastgim_bench_naive_gim"

Explainer = Callable[[nn.Module, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- model


def build_model(scale_name: str, device: torch.device) -> LlamaForCausalLM:
    """The suite's Llama (random weights, eval mode) for ``"cpu"`` or ``"gpu"``, built on ``device``."""
    kwargs, dtype = MODELS[scale_name]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build big models directly in bf16, on the device
    try:
        with device:
            model = LlamaForCausalLM(LlamaConfig(**kwargs))
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run the block with ``model`` on attention implementation ``name``; restore the previous one."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def parameter_grads_off(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gradient_times_input(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``sum_h grad * (emb - baseline_emb)`` for the logit of ``TARGET`` at the last position; ``[N]`` fp32."""
    embeddings = model.get_input_embeddings()
    with torch.no_grad():
        base = embeddings(torch.full_like(ids, BASELINE))
    emb = embeddings(ids).detach().requires_grad_(True)
    logit = model(inputs_embeds=emb, use_cache=False).logits[0, -1, TARGET]
    (grad,) = torch.autograd.grad(logit, emb)
    return (grad.float() * (emb.detach().float() - base.float())).sum(-1)[0]


# --------------------------------------------------------------------------- naive GIM


class TemperatureSoftmax(torch.autograd.Function):
    """Softmax in fp32 (as eager attention); the backward uses ``softmax(S / T)`` for ``P``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scores,) = ctx.saved_tensors
        p_t = torch.softmax(scores.float() / ctx.temperature, dim=-1)
        grad = grad.float()
        return (p_t * (grad - (grad * p_t).sum(-1, keepdim=True))).to(scores.dtype), None


class GradScale(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def naive_gim_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """Eager attention with GIM's backward: q ``(B, Hq, N, D)``, k / v ``(B, Hkv, N, D)`` -> ``(B, N, Hq, D)``."""
    groups = query.shape[1] // key.shape[1]
    query = GradScale.apply(query, Q_SCALE)
    key = GradScale.apply(key, K_SCALE).repeat_interleave(groups, dim=1)
    value = GradScale.apply(value, V_SCALE).repeat_interleave(groups, dim=1)
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]].to(scores.dtype)
    probs = TemperatureSoftmax.apply(scores, TEMPERATURE)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAIVE_IMPL, naive_gim_attention)
AttentionMaskInterface.register(NAIVE_IMPL, eager_mask)


def _frozen_rms_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.variance_epsilon).detach()
        return module.weight * (x32 * rstd).to(x.dtype)

    return forward


def _scale_output_grad(scale: float) -> Callable:
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda grad: grad * scale)

    return hook


@contextlib.contextmanager
def naive_gim_rules(model: nn.Module) -> Iterator[None]:
    """Naive GIM on a Llama-family model: eager GIM attention, frozen RMSNorms, halved gate / up grads."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    mlps = [m for m in model.modules() if hasattr(m, "gate_proj") and hasattr(m, "up_proj")]
    if not norms or not mlps:
        raise TypeError(f"naive GIM supports Llama-family models only, not {type(model).__name__}")
    handles = []
    try:
        for norm in norms:
            norm.forward = _frozen_rms_forward(norm)
        for mlp in mlps:
            handles.append(mlp.gate_proj.register_forward_hook(_scale_output_grad(GATE_SCALE)))
            handles.append(mlp.up_proj.register_forward_hook(_scale_output_grad(UP_SCALE)))
        with attention_implementation(model, NAIVE_IMPL):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for norm in norms:
            norm.__dict__.pop("forward", None)


# --------------------------------------------------------------------------- the methods


def explain_fastgim(model: nn.Module, ids: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """``fastgim.explain`` on ``gim_fused``, optionally with per-layer activation checkpointing."""
    kwargs = {"target_token_id": TARGET, "baseline_token_id": BASELINE}
    with attention_implementation(model, "gim_fused"):
        if not checkpoint:
            return fastgim.explain(model, ids, **kwargs)
        if "checkpoint" in inspect.signature(fastgim.explain).parameters:
            return fastgim.explain(model, ids, checkpoint=True, **kwargs)
        with checkpoint_layers(model):
            return fastgim.explain(model, ids, **kwargs)


def explain_grad_x_input(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Plain gradient x input on SDPA, parameters' gradients off."""
    with attention_implementation(model, "sdpa"), parameter_grads_off(model), torch.enable_grad():
        return gradient_times_input(model, ids)


def explain_gim_explain(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """gim-explain 0.1.4's ``gim.explain`` as published, on SDPA (its default)."""
    gim = pytest.importorskip("gim", reason="gim-explain 0.1.4 is not installed (pip install gim-explain==0.1.4)")
    with attention_implementation(model, "sdpa"), torch.enable_grad():
        try:
            return gim.explain(model, ids, target_token_id=TARGET, baseline_token_id=BASELINE)
        finally:
            model.zero_grad(set_to_none=True)


def explain_naive_gim(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The naive, correct GIM of :func:`naive_gim_rules`, parameters' gradients off."""
    with naive_gim_rules(model), parameter_grads_off(model), torch.enable_grad():
        return gradient_times_input(model, ids)


EXPLAINERS: dict[str, Explainer] = {
    "fastgim": explain_fastgim,
    "fastgim-checkpoint": lambda model, ids: explain_fastgim(model, ids, checkpoint=True),
    "grad-x-input": explain_grad_x_input,
    "gim-explain": explain_gim_explain,
    "naive-gim": explain_naive_gim,
}


@pytest.fixture(scope="module")
def model(bench, device) -> LlamaForCausalLM:
    """The suite's model, built once per session on the device."""
    built = build_model(bench.scale, device)
    kwargs, dtype = MODELS[bench.scale]
    bench.describe(SUITE, {
        "what": "explain one prompt end to end (forward + backward to the embeddings), batch 1",
        "model": "LlamaForCausalLM, random weights: " + ", ".join(f"{k}={v}" for k, v in kwargs.items()),
        "parameters": sum(p.numel() for p in built.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "target": f"logit of token {TARGET} at the last position, baseline token {BASELINE}",
        "gim": f"T={TEMPERATURE}, q/k/v {Q_SCALE}/{K_SCALE}/{V_SCALE}, gate/up {GATE_SCALE}/{UP_SCALE}, frozen norms",
    })
    yield built
    del built


@pytest.mark.parametrize("method", METHODS)
def test_explain(timer, bench, device, model, method: str, length: int) -> None:
    explainer = EXPLAINERS[method]
    if method == "gim-explain":
        pytest.importorskip("gim", reason="gim-explain 0.1.4 is not installed (pip install gim-explain==0.1.4)")
    timer.group = f"explain N={length}"
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(1, model.config.vocab_size, (1, length), generator=generator).to(device)
    result: list[torch.Tensor] = []

    def call() -> None:
        result[:] = [explainer(model, ids)]

    row = bench.run(timer, call, suite=SUITE, method=method, length=length,
                    info={"dtype": str(model.dtype).removeprefix("torch.")})
    if row["status"] == "ok":
        attribution = result[0]
        assert attribution.shape == (length,), f"{method}: attribution shape {tuple(attribution.shape)}"
        assert torch.isfinite(attribution).all(), f"{method}: non-finite attributions"
