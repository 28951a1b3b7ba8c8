"""Bad input gets clear errors, and the model is unchanged afterwards; nesting rules of GIM."""

from __future__ import annotations

import pytest
import torch
from reference_gim import VOCAB, build_model
from torch import nn

from fastgim.explain import explain
from fastgim.gim import GIM
from fastgim.settings import current_settings

_CACHE: dict[str, nn.Module] = {}


def _model(family: str = "llama") -> nn.Module:
    if family not in _CACHE:
        _CACHE[family] = build_model(family, seed=11)
    return _CACHE[family]


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _snapshot(model: nn.Module):
    return (
        {n: tuple(k for k in ("forward", "_apply_gate") if k in m.__dict__) for n, m in model.named_modules()},
        {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
         for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: p.detach().clone() for n, p in model.named_parameters()},
        model.config._attn_implementation,
        [type(m) for m in model.modules()],
    )


def _assert_unchanged(model: nn.Module, before, *, outside_gim: bool = True) -> None:
    after = _snapshot(model)
    for i in (0, 1, 2, 4, 5):
        assert before[i] == after[i]
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])
    assert current_settings() is None or not outside_gim


BAD_INPUTS = [
    ("empty", dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty"),
    ("too_large", dict(input_ids=torch.tensor([[3, VOCAB, 4]])), ValueError, "outside the model's vocabulary"),
    ("negative", dict(input_ids=torch.tensor([3, -1, 4])), ValueError, "outside the model's vocabulary"),
    ("float_ids", dict(input_ids=torch.rand(1, 4)), TypeError, "integer token ids"),
    ("three_dims", dict(input_ids=torch.ones(1, 2, 3, dtype=torch.long)), ValueError, r"\[seq_len\]"),
    ("position", dict(target_position=6), ValueError, "target_position 6 is out of range"),
    ("position_neg", dict(target_position=-7), ValueError, "out of range"),
    ("position_padded", dict(attention_mask=torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]]), target_position=-4),
     ValueError, "3 real tokens"),
    ("baseline", dict(baseline_token_id=VOCAB), ValueError, "baseline_token_id"),
    ("no_baseline", dict(baseline_token_id=None), ValueError, "baseline_token_id=<id> or tokenizer"),
    ("mask_shape", dict(attention_mask=torch.ones(2, 5)), ValueError, "attention_mask must have the shape"),
    ("mask_values", dict(attention_mask=torch.full((2, 6), 2)), ValueError, "only 0"),
    ("mask_empty_row", dict(attention_mask=torch.tensor([[1] * 6, [0] * 6])), ValueError, "row 1 has no real"),
    ("target_vocab", dict(target_token_id=VOCAB + 1), ValueError, "target_token_id"),
    ("target_rows", dict(target_token_id=[1, 2, 3]), ValueError, "one per row"),
    ("contrast_vocab", dict(contrast_token_id=-2), ValueError, "contrast_token_id"),
    ("temperature", dict(softmax_temperature=0.0), ValueError, "softmax_temperature"),
]


@pytest.mark.parametrize("case,kwargs,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_clear_error_model_unchanged(case, kwargs, error, match):
    model = _model()
    before = _snapshot(model)
    args = dict(input_ids=_ids(2, 6), baseline_token_id=0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        explain(model, **args)
    _assert_unchanged(model, before)


def _not_routed_model(family: str) -> nn.Module:
    """A tiny model of ``family``; "hand_written" is a Llama subclass that declares no AttentionInterface
    support, so that the refusal is tested whatever transformers version routes which family."""
    import transformers as t

    if family == "hand_written":
        class HandWrittenAttentionModel(t.LlamaForCausalLM):
            _supports_attention_backend = False

        return HandWrittenAttentionModel(t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                       num_hidden_layers=1, num_attention_heads=4)).eval()
    configs = {
        "falcon": (t.FalconForCausalLM, t.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=4)),
        "bloom": (t.BloomForCausalLM, t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)),
        "gptj": (t.GPTJForCausalLM, t.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                                 n_positions=32)),
    }
    cls, config = configs[family]
    if getattr(cls, "_supports_attention_backend", False):
        pytest.skip(f"transformers {t.__version__} routes {family}'s attention through AttentionInterface: "
                    "supported, tested in test_gim_families.py")
    return cls(config).eval()


@pytest.mark.parametrize("family", ["hand_written", "falcon", "bloom", "gptj"])
def test_architecture_not_routed_through_interface(family):
    model = _not_routed_model(family)
    before = _snapshot(model)
    # Served by the function mode (fastgim.function_mode) by default; the registry path refuses it.
    with pytest.raises(TypeError, match=r"AttentionInterface.*Supported families: Llama"):
        explain(model, _ids(1, 5), baseline_token_id=0, integration="registry")
    with pytest.raises(TypeError, match=type(model).__name__):
        with GIM(model, integration="registry"):
            pass
    _assert_unchanged(model, before)


class WeirdNorm(nn.Module):
    """A norm no RMSNorm / LayerNorm spec reproduces (max-abs scaling)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * x / (x.abs().amax(-1, keepdim=True) + self.variance_epsilon)


class MyRMSNorm(nn.Module):
    """A user's own Llama-style RMSNorm: accepted by duck typing."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden) + 0.5)
        self.eps = 1e-5

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def test_unknown_norm_class_is_named_and_nothing_changes():
    model = build_model("llama", seed=12)
    model.model.layers[1].post_attention_layernorm = WeirdNorm(model.config.hidden_size)
    before = _snapshot(model)
    with pytest.raises(TypeError, match="WeirdNorm"):
        explain(model, _ids(1, 5), baseline_token_id=0)
    with pytest.raises(TypeError, match="freeze_norm=False"):
        with GIM(model):
            pass
    _assert_unchanged(model, before)
    got = explain(model, _ids(1, 5), baseline_token_id=0, freeze_norm=False)  # the rule off: works
    assert torch.isfinite(got).all()


def test_duck_typed_norm_is_frozen():
    model = build_model("llama", seed=13)
    model.model.layers[0].input_layernorm = MyRMSNorm(model.config.hidden_size)
    model.set_attn_implementation("gim_fused")
    ids = _ids(1, 6, seed=3)
    with torch.no_grad():
        plain = model(ids).logits
    x = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    norm = model.model.layers[0].input_layernorm
    with GIM(model):
        assert torch.equal(model(ids).logits, plain)
        (grad,) = torch.autograd.grad((norm(x) * torch.arange(32.0)).sum(), x)
    x32 = x.detach()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(grad, norm.weight.detach() * torch.arange(32.0) * rstd)


class StrangeMLP(nn.Module):
    """A fused gated MLP whose [gate, up] order is unknown to GIM."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(torch.nn.functional.silu(gate) * up)


def test_unknown_gated_mlp_is_named_and_enter_rolls_back():
    model = build_model("llama", seed=14)
    model.model.layers[1].mlp = StrangeMLP(model.config.hidden_size)
    before = _snapshot(model)
    with pytest.raises(TypeError, match="StrangeMLP"):
        with GIM(model):  # norms and attention get installed first, then the MLP scan fails
            pass
    _assert_unchanged(model, before)
    with pytest.raises(TypeError, match="gate_scale=None and up_scale=None"):
        explain(model, _ids(1, 5), baseline_token_id=0)
    _assert_unchanged(model, before)
    got = explain(model, _ids(1, 5), baseline_token_id=0, gate_scale=None, up_scale=None)
    assert torch.isfinite(got).all()


def test_exception_inside_block_restores_and_settings_reset():
    model = _model()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with GIM(model, softmax_temperature=3.0):
            assert current_settings().softmax_temperature == 3.0
            raise RuntimeError("inside")
    _assert_unchanged(model, before)


def test_nesting_same_model_inner_settings_win():
    model = _model()
    before = _snapshot(model)
    with GIM(model, freeze_norm=False, gate_scale=None, up_scale=None):
        assert current_settings().freeze_norm is False
        with GIM(model, q_scale=0.1):  # installs the norm and MLP patches too
            assert current_settings().q_scale == 0.1 and current_settings().freeze_norm
            assert model.model.norm.__dict__.get("forward") is not None
        assert current_settings().q_scale == 0.25 and current_settings().freeze_norm is False
        assert model.config._attn_implementation == "gim_fused"
    _assert_unchanged(model, before)


def test_nesting_two_models():
    a, b = _model("llama"), _model("gpt2")
    before_a, before_b = _snapshot(a), _snapshot(b)
    with GIM(a):
        with GIM(b):  # same settings: fine
            assert b.config._attn_implementation == "gim_fused"
        with pytest.raises(RuntimeError, match="per thread"):
            with GIM(b, softmax_temperature=4.0):
                pass
        _assert_unchanged(b, before_b, outside_gim=False)
    _assert_unchanged(a, before_a)


def test_gim_object_not_reentrant_and_argument_checks():
    model = _model()
    gim = GIM(model)
    with gim:
        with pytest.raises(RuntimeError, match="already active"):
            gim.__enter__()
    with gim:  # usable again after exit
        pass
    with pytest.raises(TypeError, match="torch.nn.Module"):
        GIM("not a model")
    with pytest.raises(TypeError, match="q_scale"):
        GIM(model, q_scale="big")


def test_hooked_transformer_without_tlens_support(monkeypatch):
    import sys

    class HookedTransformer(nn.Module):
        pass

    monkeypatch.setitem(sys.modules, "fastgim.integrations.tlens", None)  # as if fastgim.integrations.tlens were not installed
    with pytest.raises(TypeError, match="fastgim.integrations.tlens"):
        with GIM(HookedTransformer()):
            pass
    with pytest.raises(TypeError, match="fastgim.integrations.tlens"):
        explain(HookedTransformer(), torch.tensor([1, 2]), baseline_token_id=0)
