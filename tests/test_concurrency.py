"""Concurrent ``explain`` calls on one model: every result as if alone, the model unchanged afterwards.

Per-call state (GIM settings, kept rows, checkpointing, head gates) lives in context variables; the
patches and hooks it needs are installed once per model and reference counted
(:mod:`fastgim.model_patches`), so calls in other threads, and plain inference beside them, are
unaffected.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastgim.checkpointing import checkpoint_layers, transformer_blocks
from fastgim.explain import explain
from fastgim.params import eval_mode, no_parameter_grads
from fastgim.pruning import target_rows_only

VOCAB = 67
THREADS = 4
CALLS = 8
SETTINGS = [
    {},
    {"freeze_norm": False, "softmax_temperature": None, "q_scale": None, "k_scale": None, "v_scale": None,
     "gate_scale": None, "up_scale": None},
    {"softmax_temperature": 5.0, "q_scale": 1.0, "gate_scale": None},
    {"freeze_norm": False, "v_scale": 0.1, "up_scale": 2.0},
]


def _model(attn: str) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():
        for layer in model.model.layers:  # sharp attention: the temperature visibly matters
            layer.self_attn.q_proj.weight.mul_(15)
    model.lm_head.weight.requires_grad_(False)  # a mix of flags, to be restored exactly
    return model


def _state(model: torch.nn.Module) -> dict:
    """Everything a call could leave changed on the model."""
    return {
        "flags": [p.requires_grad for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(m._forward_hooks_with_kwargs), "forward" in m.__dict__, "_old_forward" in m.__dict__)
            for m in model.modules()
        ],
        "attention": model.config._attn_implementation,
        "use_cache": model.config.use_cache,
        "training": model.training,
    }


def _call(thread: int, call: int) -> dict:
    """The arguments of call ``call`` of thread ``thread``: its own lengths, batch, settings and targets."""
    generator = torch.Generator().manual_seed(100 * thread + call)
    batch, length = 1 + (call % 2), 4 + (3 * thread + call) % 9
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if batch == 2:
        mask[1, : length // 2] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, baseline_token_id=0, target_position=-1 - call % 2,
                checkpoint=call % 3 == 1, **SETTINGS[thread])


def _plain_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("attn", ["gim_fused", "sdpa"])
def test_concurrent_explain_equals_single_threaded_and_leaves_the_model_unchanged(attn: str) -> None:
    model = _model(attn)
    before = _state(model)
    calls = {(t, c): _call(t, c) for t in range(THREADS) for c in range(CALLS)}
    expected = {key: explain(model, **kwargs) for key, kwargs in calls.items()}
    plain_ids = torch.randint(1, VOCAB, (2, 11))
    plain_expected = _plain_logits(model, plain_ids)
    assert _state(model) == before
    other = explain(model, **{**calls[0, 0], **SETTINGS[1]})
    assert (expected[0, 0] - other).abs().max() > 1e-3 * other.abs().max(), "the settings must matter"

    results: dict[tuple[int, int], torch.Tensor] = {}
    plain: list[torch.Tensor] = []
    errors: list[BaseException] = []
    running = threading.Event()
    barrier = threading.Barrier(THREADS + 1)

    def attribute(thread: int) -> None:
        try:
            barrier.wait()
            for call in range(CALLS):
                results[thread, call] = explain(model, **calls[thread, call])
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    def infer() -> None:
        try:
            barrier.wait()
            while running.is_set() or not plain:
                plain.append(_plain_logits(model, plain_ids))
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    running.set()
    workers = [threading.Thread(target=attribute, args=(t,)) for t in range(THREADS)]
    inference = threading.Thread(target=infer)
    for thread in [*workers, inference]:
        thread.start()
    for thread in workers:
        thread.join()
    running.clear()
    inference.join()
    assert not errors, errors[0]
    for key, value in expected.items():
        assert torch.equal(results[key], value), f"thread {key[0]} call {key[1]} differs from its single run"
    for logits in plain:  # on sdpa, calls outside GIM keep sdpa even while GIM switched the model
        assert torch.equal(logits, plain_expected)
    assert _state(model) == before


def _state_of(switch: str, model: torch.nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()] if switch == "flags" else [model.training]


@pytest.mark.parametrize("switch", ["flags", "eval_mode"])
def test_switches_are_restored_by_the_last_user(switch: str) -> None:
    model = _model("gim_fused").train()
    context = {"flags": no_parameter_grads, "eval_mode": eval_mode}[switch]
    before = _state_of(switch, model)
    entered, leave = threading.Event(), threading.Event()

    def first_in_first_out() -> None:
        with context(model):
            entered.set()
            leave.wait()

    thread = threading.Thread(target=first_in_first_out)
    thread.start()
    entered.wait()
    with context(model):
        leave.set()
        thread.join()
        assert not any(_state_of(switch, model)), "switched back under a running call"
    assert _state_of(switch, model) == before, "the last user restores the model"


def test_kept_rows_and_checkpointing_act_only_in_the_calling_thread() -> None:
    model = _model("gim_fused")
    ids = torch.randint(1, VOCAB, (1, 9))
    expected = _plain_logits(model, ids)
    seen: list[torch.Tensor] = []
    last_mlp = transformer_blocks(model)[-1].mlp
    with target_rows_only(model, torch.tensor([8]), 9), checkpoint_layers(model):
        assert last_mlp._forward_pre_hooks  # installed for this thread's calls
        thread = threading.Thread(target=lambda: seen.append(_plain_logits(model, ids)))
        thread.start()
        thread.join()
        inside = _plain_logits(model, ids)
    assert torch.equal(seen[0], expected)  # the other thread: every row computed
    torch.testing.assert_close(inside[0, 8], expected[0, 8], rtol=1e-5, atol=1e-6)  # this thread: the kept row
    assert not torch.equal(inside[0, :8], expected[0, :8])
    assert not last_mlp._forward_pre_hooks and not last_mlp._forward_hooks


def test_attention_switch_outlives_the_first_user_to_leave() -> None:
    """CHG-style gating (hf.use_gim_fused) in one thread must not switch the model back under a GIM call."""
    import fastgim
    from fastgim.integrations import hf

    model = _model("sdpa")
    entered, leave, left = threading.Event(), threading.Event(), threading.Event()

    def gating_user() -> None:
        with hf.use_gim_fused(model):
            entered.set()
            leave.wait()
        left.set()

    thread = threading.Thread(target=gating_user)
    thread.start()
    entered.wait()
    with fastgim.GIM(model):
        leave.set()
        left.wait()
        assert model.config._attn_implementation == "gim_fused", "switched back while a GIM call runs"
    thread.join()
    assert model.config._attn_implementation == "sdpa"
