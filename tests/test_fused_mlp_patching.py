"""GIM's fused gated-MLP path (Triton on GPU, run here with the interpreter; PyTorch ops on CPU) equals the hooks."""

from __future__ import annotations

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

import fastgim
from fastgim import mlp_patching
from fastgim.mlp_patching import FUSABLE_SPLIT_MLPS


def _tiny(family: str) -> torch.nn.Module:
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return GemmaForCausalLM(GemmaConfig(head_dim=8, **common)).eval()


@pytest.mark.interpreter
@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize(("gate_scale", "up_scale"), [(0.5, 0.5), (0.25, None)])
def test_fused_gated_mlp_matches_hooks(monkeypatch, family: str, gate_scale, up_scale) -> None:
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the fused path on CPU needs TRITON_INTERPRET=1 before triton is imported")
    model = _tiny(family)
    assert type(model.model.layers[0].mlp).__name__ in FUSABLE_SPLIT_MLPS
    ids = torch.randint(0, 64, (2, 11))
    settings = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None,
                    gate_scale=gate_scale, up_scale=up_scale)
    monkeypatch.setattr(mlp_patching, "FUSE_ON_CPU", False)
    hooked = fastgim.explain(model, ids, baseline_token_id=0, **settings)
    monkeypatch.setenv("FASTGIM_NORM_BACKEND", "triton")
    calls = []
    from fastgim.ops import norms

    original = norms.gated_activation
    monkeypatch.setattr(norms, "gated_activation", lambda *a, **k: calls.append(k) or original(*a, **k))
    fused = fastgim.explain(model, ids, baseline_token_id=0, **settings)
    assert len(calls) == 2, "every MLP layer must take the fused kernel"
    assert calls[0]["gate_scale"] == gate_scale and calls[0]["up_scale"] == (up_scale or 1.0)
    torch.testing.assert_close(fused, hooked, rtol=1e-4, atol=1e-5 * float(hooked.abs().max()))
    plain = fastgim.explain(model, ids, baseline_token_id=0, **{**settings, "gate_scale": None, "up_scale": None})
    assert (plain - hooked).abs().max() > 1e-3 * hooked.abs().max(), "the scales must change the attribution"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize(("gate_scale", "up_scale"), [(0.5, 0.5), (0.25, None), (None, 0.5)])
def test_cpu_fused_gated_mlp_matches_hooks(monkeypatch, family: str, dtype, gate_scale, up_scale) -> None:
    monkeypatch.delenv("FASTGIM_NORM_BACKEND", raising=False)
    model = _tiny(family).to(dtype)
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(7))
    settings = dict(gate_scale=gate_scale, up_scale=up_scale)
    monkeypatch.setattr(mlp_patching, "FUSE_ON_CPU", False)
    hooked = fastgim.explain(model, ids, baseline_token_id=0, **settings)
    monkeypatch.setattr(mlp_patching, "FUSE_ON_CPU", True)
    from fastgim.ops import norms

    calls = []
    original = norms.gated_activation
    monkeypatch.setattr(norms, "gated_activation", lambda *a, **k: calls.append(k) or original(*a, **k))
    fused = fastgim.explain(model, ids, baseline_token_id=0, **settings)
    expected_calls = 0 if gate_scale is None and up_scale is None else 2
    assert len(calls) == expected_calls, "every MLP layer must take the fused op"
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fused, hooked, rtol=tolerance, atol=tolerance * float(hooked.abs().max()))
