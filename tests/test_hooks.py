"""Tests for fastgim.hooks: captured values against autograd references; handles removed on exit."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import fastgim
from fastgim.adapters import get_adapter
from fastgim.hooks import (
    autograd_node_hook,
    capture_backward_pre,
    capture_gradients,
    capture_kwargs_hook,
    tensor_grad_hook,
)

VOCAB = 37


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "attn_implementation": "gim_fused"}
    if family == "llama":  # GQA
        config = LlamaConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
                             num_key_value_heads=2, max_position_embeddings=64, **common)
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=24, n_layer=2, n_head=4, n_positions=64, **common))
    else:
        config = GPTNeoXConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=64, **common)
        model = GPTNeoXForCausalLM(config)
    return model.to(dtype).eval()


FAMILIES = ["llama", "gpt2", "gpt_neox"]


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return -model(ids).logits[:, -1, 3].sum()


def _no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not m._backward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [1, 9])
def test_capture_gradients_matches_retain_grad(family: str, length: int) -> None:
    model = tiny_model(family)
    attn = get_adapter(model).get_attention_module(0)
    ids = torch.randint(0, VOCAB, (2, length))
    kept = []
    handle = attn.register_forward_hook(lambda _m, _a, out: kept.append(out[0]) or out[0].retain_grad())
    with capture_gradients(attn, site="output") as grads:
        _loss(model, ids).backward()
    handle.remove()
    assert len(grads) == 1
    assert grads[0][0].shape == (2, length, 24)
    torch.testing.assert_close(grads[0][0], kept[0].grad)
    assert _no_hooks_left(model)


def test_capture_gradients_input_and_both() -> None:
    model = tiny_model("llama", torch.float64)
    mlp = get_adapter(model).get_mlp(1)
    ids = torch.randint(0, VOCAB, (1, 7))
    inputs = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]) or args[0].retain_grad())
    with capture_gradients(mlp, site="both") as both, capture_gradients(mlp, site="input") as only_input:
        _loss(model, ids).backward()
    handle.remove()
    torch.testing.assert_close(only_input[0][0], inputs[0].grad)
    torch.testing.assert_close(both[0][0][0], inputs[0].grad)
    assert both[0][1][0].shape == (1, 7, 24)
    with pytest.raises(ValueError, match="site must be"):
        with capture_gradients(mlp, site="middle"):
            pass


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_backward_pre_equals_grad_output(family: str) -> None:
    model = tiny_model(family)
    layer = get_adapter(model).get_layers()[1]
    ids = torch.randint(0, VOCAB, (3, 5))
    with capture_backward_pre(layer) as pre, capture_gradients(layer) as post:
        _loss(model, ids).backward()
    assert len(pre) == len(post) == 1
    torch.testing.assert_close(pre[0][0], post[0][0])


def test_capture_kwargs_hook_records_and_modifies() -> None:
    model = tiny_model("llama")
    layer = get_adapter(model).get_layers()[0]
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with capture_kwargs_hook(layer) as kw, torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    assert len(kw) == 1 and "position_embeddings" in kw[0]

    def drop_rope(kwargs: dict) -> dict:  # zeroing the rotation angles changes the output
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(sin))
        return kwargs

    with capture_kwargs_hook(layer, modify=drop_rope), torch.no_grad():
        changed = model(ids, attention_mask=mask).logits
    assert not torch.allclose(changed, reference)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_grad_hook_matches_autograd(dtype: torch.dtype) -> None:
    model = tiny_model("gpt_neox", dtype)
    ids = torch.randint(0, VOCAB, (2, 8))
    acts = []
    handle = get_adapter(model).get_mlp(0).register_forward_hook(lambda _m, _i, out: acts.append(out))
    loss = _loss(model, ids)
    handle.remove()
    (reference,) = torch.autograd.grad(loss, acts[0], retain_graph=True)
    with tensor_grad_hook(lambda: acts[0]) as grads:
        loss.backward()
    assert grads[0].shape == (2, 8, 24)
    torch.testing.assert_close(grads[0], reference)
    with pytest.raises(ValueError, match="does not require grad"):
        with tensor_grad_hook(torch.randn(3)):
            pass


def test_autograd_node_hook_records_gradients() -> None:
    model = tiny_model("llama", torch.float64)
    acts = []
    handle = get_adapter(model).get_o_proj(1).register_forward_hook(lambda _m, _i, out: acts.append(out))
    loss = _loss(model, torch.randint(0, VOCAB, (1, 5)))
    handle.remove()
    (reference,) = torch.autograd.grad(loss, acts[0], retain_graph=True)
    with autograd_node_hook(acts[0]) as post, autograd_node_hook(acts[0], pre=True) as pre:
        loss.backward()
    torch.testing.assert_close(pre[0]["grad_outputs"][0], reference)
    torch.testing.assert_close(post[0]["grad_outputs"][0], reference)
    assert "grad_inputs" in post[0] and "grad_inputs" not in pre[0]
    with pytest.raises(ValueError, match="no grad_fn"):
        with autograd_node_hook(torch.randn(2, requires_grad=True)):
            pass


def test_handles_removed_after_exception() -> None:
    model = tiny_model("llama")
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (1, 4))
    for manager in (lambda: capture_gradients(adapter.get_attention_module(0)),
                    lambda: capture_backward_pre(adapter.get_mlp(0)),
                    lambda: capture_kwargs_hook(adapter.get_layers()[0])):
        with pytest.raises(RuntimeError, match="boom"):
            with manager() as records:
                raise RuntimeError("boom")
        assert _no_hooks_left(model)
        _loss(model, ids).backward()  # after exit nothing records any more
        assert records == []
    acts = []
    handle = adapter.get_mlp(0).register_forward_hook(lambda _m, _i, out: acts.append(out))
    loss = _loss(model, ids)
    handle.remove()
    with pytest.raises(RuntimeError, match="boom"):
        with tensor_grad_hook(acts[0]) as grads:
            raise RuntimeError("boom")
    loss.backward()
    assert grads == []


def test_bad_module_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="expects an nn.Module"):
        with capture_gradients("layer0"):
            pass


def test_gradients_inside_gim_are_gim_gradients() -> None:
    """capture_gradients inside fastgim.GIM sees GIM's modified gradient (different from plain)."""
    model = tiny_model("llama")
    layer = get_adapter(model).get_layers()[1]
    ids = torch.randint(0, VOCAB, (1, 6))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with capture_gradients(layer, site="input") as plain:
        (-model(inputs_embeds=embeds).logits[:, -1, 3].sum()).backward()
    with fastgim.GIM(model), capture_gradients(layer, site="input") as gim:
        (-model(inputs_embeds=embeds).logits[:, -1, 3].sum()).backward()
    assert plain[0][0].shape == gim[0][0].shape
    assert not torch.allclose(plain[0][0], gim[0][0], atol=1e-6)
