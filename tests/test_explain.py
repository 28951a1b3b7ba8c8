"""fastgim.explain: batches, padding, targets, baselines, head masks, flags, warnings, threads."""

from __future__ import annotations

import threading

import pytest
import torch
from reference_gim import VOCAB, build_model

from fastgim.explain import explain, resolve_baseline

_CACHE: dict[str, torch.nn.Module] = {}


def _model(family: str = "llama") -> torch.nn.Module:
    if family not in _CACHE:
        _CACHE[family] = build_model(family, seed=3)
    return _CACHE[family]


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item() + 1e-9)


@pytest.mark.parametrize("seq", [1, 5, 12])
def test_shapes(seq):
    model = _model()
    ids = _ids(3, seq, seed=seq)
    assert explain(model, ids[0], baseline_token_id=0).shape == (seq,)
    assert explain(model, ids[:1], baseline_token_id=0).shape == (seq,)
    batched = explain(model, ids, baseline_token_id=0)
    assert batched.shape == (3, seq) and batched.dtype == torch.float32
    _close(batched[1], explain(model, ids[1], baseline_token_id=0))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_padded_batch_equals_each_row_alone(family, padding):
    model = _model(family)
    lengths = [9, 4, 7]
    rows = [_ids(1, n, seed=10 + n)[0] for n in lengths]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(9 - len(row), 9) if padding == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    targets = torch.tensor([5, 17, 99])
    got = explain(model, ids, attention_mask=mask, baseline_token_id=0, target_token_id=targets, target_position=-2)
    assert (got[mask == 0] == 0).all()
    for i, row in enumerate(rows):
        alone = explain(model, row, baseline_token_id=0, target_token_id=int(targets[i]), target_position=-2)
        _close(got[i][mask[i].bool()], alone)


def test_default_target_is_argmax_and_contrast_is_a_difference():
    model = _model()
    ids = _ids(2, 8, seed=1)
    with torch.no_grad():
        argmax = model(ids).logits[:, 3].argmax(-1)
    default = explain(model, ids, baseline_token_id=0, target_position=3)
    _close(default, explain(model, ids, baseline_token_id=0, target_position=3, target_token_id=argmax.tolist()))
    contrast = explain(model, ids, baseline_token_id=0, target_token_id=11, contrast_token_id=[20, 30])
    t = explain(model, ids, baseline_token_id=0, target_token_id=11)
    c = explain(model, ids, baseline_token_id=0, target_token_id=torch.tensor([20, 30]))
    _close(contrast, t - c)


class _Tokenizer:
    def __init__(self, space, pad, unk):
        self.space, self.pad_token_id, self.unk_token_id = space, pad, unk

    def encode(self, text, add_special_tokens=False):
        assert text == " " and add_special_tokens is False
        return list(self.space)


@pytest.mark.parametrize(
    "space,pad,unk,expected",
    [([7], 1, 2, 7), ([7, 8], 1, 2, 1), ([], None, 2, 2), ([VOCAB + 5], 4, None, 4)],
)
def test_baseline_resolution(space, pad, unk, expected):
    tokenizer = _Tokenizer(space, pad, unk)
    assert resolve_baseline(None, tokenizer, VOCAB) == expected
    assert resolve_baseline(9, tokenizer, VOCAB) == 9
    model = _model()
    ids = _ids(1, 6, seed=2)
    _close(explain(model, ids, tokenizer=tokenizer), explain(model, ids, baseline_token_id=expected))


def test_baseline_changes_attribution():
    model = _model()
    ids = _ids(1, 6, seed=4)
    a, b = explain(model, ids, baseline_token_id=0), explain(model, ids, baseline_token_id=50)
    assert (a - b).abs().max() > 1e-4


def test_works_under_no_grad():
    model = _model()
    ids = _ids(1, 6, seed=12)
    expected = explain(model, ids, baseline_token_id=0)
    with torch.no_grad():
        _close(explain(model, ids, baseline_token_id=0), expected)


def test_requires_grad_restored_and_no_weight_grads():
    model = _model()
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 != 0)
        p.grad = None
    explain(model, _ids(2, 6, seed=5), baseline_token_id=0)
    assert [p.requires_grad for p in params] == [i % 3 != 0 for i in range(len(params))]
    assert all(p.grad is None for p in params)
    for p in params:
        p.requires_grad_(True)


def test_training_mode_warns():
    model = build_model("llama", seed=5)
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        explain(model, _ids(1, 5, seed=6), baseline_token_id=0)
    assert model.training


def test_head_mask_gates_heads():
    model = _model()
    ids = _ids(2, 7, seed=7)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    plain = explain(model, ids, baseline_token_id=0, target_token_id=3)
    _close(explain(model, ids, baseline_token_id=0, target_token_id=3, head_mask=torch.ones(layers, heads)), plain)
    mask = torch.ones(layers, heads)
    mask[1, 2] = 0.0
    gated = explain(model, ids, baseline_token_id=0, target_token_id=3, head_mask=mask)
    assert (gated - plain).abs().max() > 1e-5 * plain.abs().max()
    per_row = torch.ones(2, layers, heads)
    per_row[1] = mask
    both = explain(model, ids, baseline_token_id=0, target_token_id=3, head_mask=per_row)
    _close(both[0], plain[0])
    _close(both[1], gated[1])


def test_encoder_with_target_callable():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, attn_implementation="eager",
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config).eval()
    ids = _ids(2, 6, seed=8)

    def target(outputs):
        return outputs.last_hidden_state[:, 0, :4].sum(-1)

    got = explain(model, ids, baseline_token_id=0, target=target)
    assert got.shape == (2, 6) and torch.isfinite(got).all() and got.abs().max() > 0
    with pytest.raises(TypeError, match="target=callable"):
        explain(model, ids, baseline_token_id=0)


def test_threads_with_different_settings_do_not_leak():
    model = _model()
    ids = _ids(2, 8, seed=9)
    settings = [dict(), dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None,
                             gate_scale=None, up_scale=None)]
    expected = [explain(model, ids, baseline_token_id=0, **s) for s in settings]
    assert (expected[0] - expected[1]).abs().max() > 1e-3 * expected[0].abs().max()
    barrier = threading.Barrier(2)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(4):
                results[k].append(explain(model, ids, baseline_token_id=0, **settings[k]))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in (0, 1):
        for got in results[k]:
            _close(got, expected[k])
    assert model.config._attn_implementation == "eager"
    assert not any("forward" in m.__dict__ for m in model.modules())
