"""The ``sdpa`` backend as the GPU oracle: sdpa vs the float64 reference under the accuracy policy
(every feature but softcap, which it refuses), and Triton vs sdpa, on GPU. A CPU version of the
Triton-vs-sdpa check (Triton interpreter, float32, small) runs in CI so the GPU tests cannot rot.
"""

from __future__ import annotations

import pytest
import torch
from test_attention_triton import (
    FEATURES,
    GIM_OFF,
    GIM_ON,
    Case,
    _inputs,
    _triton,
    check_case,
    gpu,
    interpreter,
)

from fastgim.settings import AttentionGIM

SDPA_FEATURES = [name for name, case in FEATURES.items() if case.softcap is None]
#: Largest |triton - sdpa| relative to the largest |sdpa| value, per dtype (both are within the
#: accuracy policy of the float64 reference elsewhere; this bounds how far apart they may be).
AGREEMENT = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def triton_sdpa_gaps(case: Case, dtype: torch.dtype, gim: AttentionGIM) -> dict[str, float]:
    """``max |triton - sdpa| / max |sdpa|`` for the output, the LSE and every gradient, same inputs."""
    tensors = _inputs(case, dtype)
    fused, oracle = _triton(case, gim, tensors, "triton"), _triton(case, gim, tensors, "sdpa")
    gaps = {}
    for name, want in oracle.items():
        got = fused[name]
        if want is None:
            assert got is None, name
            continue
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)), f"{name}: -inf rows differ"
        want, got = want[finite].double(), got[finite].double()
        scale = max(want.abs().max().item(), 1e-6) if want.numel() else 1.0
        gaps[name] = (got - want).abs().max().item() / scale if want.numel() else 0.0
    return gaps


def check_agreement(case: Case, dtype: torch.dtype, gim: AttentionGIM) -> None:
    gaps = triton_sdpa_gaps(case, dtype, gim)
    assert all(gap <= AGREEMENT[dtype] for gap in gaps.values()), f"triton vs sdpa relative gaps: {gaps}"


# --------------------------------------------------------------------------- CPU (interpreter)


@interpreter
@pytest.mark.parametrize("feature", ["causal", "pad_causal", "gate", "window_causal"])
def test_triton_agrees_with_sdpa_smoke(feature: str) -> None:
    check_agreement(FEATURES[feature], torch.float32, GIM_ON)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("gim", [GIM_ON, GIM_OFF], ids=["gim", "plain"])
@pytest.mark.parametrize("feature", SDPA_FEATURES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_sdpa_backend_features(dtype, feature, gim):
    check_case(FEATURES[feature], dtype, gim, backend="sdpa")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("gim", [GIM_ON, GIM_OFF], ids=["gim", "plain"])
@pytest.mark.parametrize("feature", SDPA_FEATURES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_triton_agrees_with_sdpa(dtype, feature, gim):
    check_agreement(FEATURES[feature], dtype, gim)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("gim", [GIM_ON, GIM_OFF], ids=["gim", "plain"])
@pytest.mark.parametrize("length", [4096])
def test_gpu_triton_agrees_with_sdpa_on_the_benchmark_shape(length, gim):
    """B=1, Hq=32, Hkv=8, D=128, bf16, causal: the attention benchmark's shape (one batch row)."""
    check_agreement(Case(batch=1, hq=32, hkv=8, lq=length, lk=length, dim=128), torch.bfloat16, gim)
