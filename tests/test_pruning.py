"""explain() runs the last block only at the target rows (fastgim.pruning): same attributions, less work."""

from __future__ import annotations

import importlib

import pytest
import torch
from reference_gim import FAMILIES, VOCAB, build_model

from fastgim.checkpointing import transformer_blocks
from fastgim.explain import explain
from fastgim.integrations import hf
from fastgim.pruning import LAST_QUERY_ONLY, target_rows_only

explain_module = importlib.import_module("fastgim.explain")  # fastgim.explain is also the function
CAUSAL = [family for family in FAMILIES if family != "bert"]
SEQ = 13
_MODELS: dict[str, torch.nn.Module] = {}


def _model(family: str) -> torch.nn.Module:
    if family not in _MODELS:
        _MODELS[family] = build_model(family, seed=5)
    return _MODELS[family]


def _inputs(padding: str | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :5] = 0
        mask[2, :2] = 0
    elif padding == "right":
        mask[1, -5:] = 0
        mask[2, -2:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _explain(model, ids, mask, prune: bool, monkeypatch, **kwargs) -> torch.Tensor:
    monkeypatch.setattr(explain_module, "PRUNE_LAST_BLOCK", prune)
    return explain(model, ids, attention_mask=mask, baseline_token_id=0, contrast_token_id=4, **kwargs)


@pytest.mark.parametrize("target_position", [-1, -3])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("family", CAUSAL)
def test_pruned_explain_equals_full_explain(family, padding, target_position, monkeypatch):
    model = _model(family)
    ids, mask = _inputs(padding, seed=CAUSAL.index(family))
    full = _explain(model, ids, mask, False, monkeypatch, target_position=target_position)
    pruned = _explain(model, ids, mask, True, monkeypatch, target_position=target_position)
    torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-6 * full.abs().max().item())


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "mixtral"])
def test_pruned_explain_with_checkpointing(family, monkeypatch):
    model = _model(family)
    ids, mask = _inputs("left", seed=11)
    full = _explain(model, ids, mask, False, monkeypatch)
    pruned = _explain(model, ids, mask, True, monkeypatch, checkpoint=True)
    torch.testing.assert_close(pruned, full, rtol=1e-5, atol=1e-6 * full.abs().max().item())


@pytest.mark.parametrize(("padding", "mlp_rows", "last_query_rows"), [("left", 1, 1), ("right", 3, SEQ)])
def test_last_block_computes_only_the_target_rows(padding, mlp_rows, last_query_rows, monkeypatch):
    model = _model("llama")
    ids, mask = _inputs(padding, seed=3)
    last = transformer_blocks(model)[-1]
    seen: dict[str, list[int]] = {"mlp": [], "query": []}
    handle = last.mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen["mlp"].append(args[0].shape[1]))
    real_attention = hf.attention

    def recording_attention(query, *args, **kwargs):
        seen["query"].append(query.shape[2])
        return real_attention(query, *args, **kwargs)

    monkeypatch.setattr(hf, "attention", recording_attention)
    try:
        _explain(model, ids, mask, True, monkeypatch)
    finally:
        handle.remove()
    assert seen["mlp"] == [mlp_rows]
    assert seen["query"][:-1] == [SEQ] * (len(transformer_blocks(model)) - 1)
    assert seen["query"][-1] == last_query_rows
    assert LAST_QUERY_ONLY.get() == frozenset()
    assert not last.mlp._forward_hooks and not last.mlp._forward_pre_hooks  # removed afterwards


def test_hooks_are_removed_after_an_error():
    model = _model("llama")
    last = transformer_blocks(model)[-1]
    with pytest.raises(RuntimeError, match="boom"), target_rows_only(model, torch.tensor([SEQ - 1]), SEQ):
        assert last.mlp._forward_pre_hooks and LAST_QUERY_ONLY.get()
        raise RuntimeError("boom")
    assert not last.mlp._forward_pre_hooks and not last.mlp._forward_hooks
    assert LAST_QUERY_ONLY.get() == frozenset()


def test_model_without_a_known_feed_forward_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with target_rows_only(model, torch.tensor([0]), 1) as installed:
        assert installed is False
