"""Tests for fastgim.integrations.tlens: GIM on TransformerLens HookedTransformer models.

References: gim-explain 0.1.4's TL path (gated-MLP scales off, its only difference), our HF
path on the same weights (converted with TL's own weight conversion), and hand-written
checks of each hook rule.
"""

from __future__ import annotations

import pytest
import torch

tl = pytest.importorskip("transformer_lens")
gim_explain = pytest.importorskip("gim")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastgim  # noqa: E402
from fastgim.integrations.tlens import GIM, explain_tlens, gim_context, is_tlens_model  # noqa: E402
from fastgim.settings import GIMSettings  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
VOCAB = 41


def hooked(gated: bool, *, dtype: torch.dtype = torch.float64, gqa: bool = False, seed: int = 0,
           layers: int = 2) -> tl.HookedTransformer:
    config = tl.HookedTransformerConfig(
        n_layers=layers, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=VOCAB, d_mlp=48,
        act_fn="silu" if gated else "gelu_new", gated_mlp=gated, normalization_type="RMS" if gated else "LN",
        positional_embedding_type="rotary" if gated else "standard", n_key_value_heads=2 if gqa else None,
        dtype=dtype, seed=seed,
    )
    return tl.HookedTransformer(config)


OFF = {"gate_scale": None, "up_scale": None}


@pytest.mark.parametrize(("gated", "gqa"), [(True, False), (True, True), (False, False)],
                         ids=["gated", "gated-gqa", "gelu-layernorm"])
@pytest.mark.parametrize("length", [1, 9, 33])
def test_matches_gim_explain_tl_path(gated: bool, gqa: bool, length: int) -> None:
    model = hooked(gated, gqa=gqa)
    ids = torch.randint(0, VOCAB, (1, length))
    reference = gim_explain.explain(model, ids, baseline_token_id=3)
    ours = explain_tlens(model, ids, baseline_token_id=3, **OFF)
    assert ours.dtype == torch.float32 and ours.shape == (length,)
    torch.testing.assert_close(ours, reference.float(), atol=1e-6, rtol=1e-5)
    plain = explain_tlens(model, ids, baseline_token_id=3, freeze_norm=False, softmax_temperature=None,
                          q_scale=None, k_scale=None, v_scale=None, **OFF)
    if length > 1:  # GIM differs from the plain gradient
        assert not torch.allclose(plain, ours, atol=1e-5)


def test_gated_mlp_scales_act_on_hook_pre_and_pre_linear() -> None:
    """With only the gate/up rules on, the gradient equals the plain one with MLP branch grads halved."""
    model = hooked(True)
    ids = torch.randint(0, VOCAB, (1, 7))
    settings = GIMSettings(False, None, None, None, None, 0.5, 0.5)
    emb = model.embed(ids).detach().requires_grad_(True)

    def grad_with(hooks: list) -> torch.Tensor:
        logits = model.run_with_hooks(ids, fwd_hooks=[("hook_embed", lambda _t, hook: emb), *hooks])
        (g,) = torch.autograd.grad(logits[0, -1, 5], emb)
        return g

    with gim_context(model, settings):
        ours = grad_with([])

    def half(t: torch.Tensor, hook) -> torch.Tensor:
        return 0.5 * t + 0.5 * t.detach()  # same value, half the gradient

    reference = grad_with([(lambda n: n.endswith("mlp.hook_pre") or n.endswith("mlp.hook_pre_linear"), half)])
    torch.testing.assert_close(ours, reference)
    assert not torch.allclose(ours, grad_with([]))


def test_temperature_only_in_attention_softmax() -> None:
    """A softmax-based metric keeps its ordinary gradient (no global torch.softmax patch)."""
    model = hooked(False)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    (reference,) = torch.autograd.grad(torch.softmax(x, -1)[:, 0].sum(), x)
    with gim_context(model):
        (inside,) = torch.autograd.grad(torch.softmax(x, -1)[:, 0].sum(), x)
        (tensor_method,) = torch.autograd.grad(x.softmax(-1)[:, 0].sum(), x)
    torch.testing.assert_close(inside, reference)
    torch.testing.assert_close(tensor_method, reference)


def test_temperature_rule_matches_hand_written_backward() -> None:
    """Gradient at hook_attn_scores equals P_T * (dP - rowsum(dP * P_T)) with P_T = softmax(S / T)."""
    model = hooked(False, layers=1)
    ids = torch.randint(0, VOCAB, (2, 6))
    saved: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(t: torch.Tensor, hook) -> None:
            saved[name] = t
            t.retain_grad()
        return hook

    settings = GIMSettings(False, 3.0, None, None, None, None, None)
    with torch.enable_grad(), gim_context(model, settings):
        logits = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_attn_scores", keep("s")),
                                                       ("blocks.0.attn.hook_pattern", keep("p"))])
        logits[:, -1, 2].sum().backward()
    scores, pattern = saved["s"].detach(), saved["p"]
    p_t = torch.nan_to_num(torch.softmax(scores / 3.0, dim=-1))
    d_p = pattern.grad
    expected = p_t * (d_p - (d_p * p_t).sum(-1, keepdim=True))
    torch.testing.assert_close(saved["s"].grad, expected)


def test_hooks_removed_even_after_exception() -> None:
    model = hooked(True)
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(RuntimeError, match="boom"):
        with gim_context(model):
            model(ids)
            raise RuntimeError("boom")
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    emb_plain = explain_tlens(model, ids, baseline_token_id=1, freeze_norm=False, softmax_temperature=None,
                              q_scale=None, k_scale=None, v_scale=None, gate_scale=None, up_scale=None)
    emb = model.embed(ids).detach().requires_grad_(True)
    logits = model.run_with_hooks(ids, fwd_hooks=[("hook_embed", lambda _t, hook: emb)])
    (grad,) = torch.autograd.grad(logits[0, -1].max(), emb)
    base = model.embed(torch.full_like(ids, 1))
    torch.testing.assert_close(emb_plain, ((emb - base) * grad).sum(-1)[0].detach().float())


def test_user_tl_hooks_survive_and_gim_class_delegates() -> None:
    model = hooked(True)
    calls = []
    model.add_hook("blocks.0.hook_resid_pre", lambda t, hook: calls.append(1))
    ids = torch.randint(0, VOCAB, (1, 6))
    emb = model.embed(ids).detach().requires_grad_(True)

    def grad() -> torch.Tensor:
        logits = model.run_with_hooks(ids, fwd_hooks=[("hook_embed", lambda _t, hook: emb)])
        return torch.autograd.grad(logits[0, -1, 4], emb)[0]

    with GIM(model, q_scale=0.1):
        ours = grad()
    with fastgim.GIM(model, q_scale=0.1):
        via_fastgim = grad()
    torch.testing.assert_close(via_fastgim, ours)
    model(ids)
    assert len(calls) == 3  # the user's hook is still registered after both contexts
    model.reset_hooks()


def test_padded_batch_contrast_and_targets() -> None:
    model = hooked(True, gqa=True)
    ids = torch.randint(2, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    ids[1, 5:] = 0
    batch = explain_tlens(model, ids, attention_mask=mask, target_token_id=torch.tensor([4, 9]), baseline_token_id=1)
    assert batch.shape == (2, 8) and (batch[1, 5:] == 0).all()
    alone = explain_tlens(model, ids[1, :5], target_token_id=9, baseline_token_id=1)
    torch.testing.assert_close(batch[1, :5], alone, atol=1e-6, rtol=1e-5)
    contrast = explain_tlens(model, ids[0], target_token_id=4, contrast_token_id=7, baseline_token_id=1)
    difference = explain_tlens(model, ids[0], target_token_id=4, baseline_token_id=1) - explain_tlens(
        model, ids[0], target_token_id=7, baseline_token_id=1)
    torch.testing.assert_close(contrast, difference, atol=1e-6, rtol=1e-5)


def test_bad_input_errors() -> None:
    model = hooked(False)
    with pytest.raises(ValueError, match="baseline_token_id"):
        explain_tlens(model, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer tensor"):
        explain_tlens(model, torch.tensor([1.0, 2.0]), baseline_token_id=1)
    with pytest.raises(ValueError, match="target_position"):
        explain_tlens(model, torch.tensor([1, 2, 3]), baseline_token_id=1, target_position=5)
    with pytest.raises(TypeError, match="HookedTransformer"):
        with gim_context(torch.nn.Linear(2, 2)):
            pass
    assert is_tlens_model(model) and not is_tlens_model(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------
# our HF path on the same weights
# --------------------------------------------------------------------------------------------------
def _llama_pair() -> tuple[LlamaForCausalLM, tl.HookedTransformer]:
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, tie_word_embeddings=False)).double().eval()
    config = tl.HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, n_key_value_heads=2, d_vocab=VOCAB, d_mlp=48,
        act_fn="silu", gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=8, rotary_base=10000, eps=1e-6, final_rms=True, dtype=torch.float64)
    model = tl.HookedTransformer(config)
    model.load_and_process_state_dict(convert_llama_weights(hf, config), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return hf, model


def _gpt2_pair() -> tuple[GPT2LMHeadModel, tl.HookedTransformer]:
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).double().eval()
    config = tl.HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=VOCAB, d_mlp=128, act_fn="gelu_new",
        normalization_type="LN", eps=1e-5, dtype=torch.float64)
    model = tl.HookedTransformer(config)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, config), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return hf, model


@pytest.mark.parametrize("pair", [_llama_pair, _gpt2_pair], ids=["llama", "gpt2"])
@pytest.mark.parametrize("rules", ["gim", "plain", "no_mlp_scales"])
def test_equals_hf_path_on_converted_weights(pair, rules: str) -> None:
    hf, model = pair()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-6, rtol=1e-6)
    kwargs = {"gim": {}, "no_mlp_scales": OFF,
              "plain": {"freeze_norm": False, "softmax_temperature": None, "q_scale": None, "k_scale": None,
                        "v_scale": None, **OFF}}[rules]
    ours_hf = fastgim.explain(hf, ids, baseline_token_id=2, **kwargs)
    ours_tl = explain_tlens(model, ids, baseline_token_id=2, **kwargs)
    torch.testing.assert_close(ours_tl, ours_hf, atol=2e-6, rtol=1e-5)
