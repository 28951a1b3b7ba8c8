"""Triton attention backend vs the float64 reference (Triton interpreter on CPU, real kernels on GPU).

Accuracy policy: the Triton error against float64 must be at most 2x (outputs, LSE) / 3x
(gradients) the error of the reference run in the same precision without upcasting, plus a small
epsilon relative to the size of the values.
"""

import os
import sys

import torch

# The interpreter only takes effect if set before triton.language is imported in this process.
_TOO_LATE = "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is imported

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import fastgim  # noqa: E402
from fastgim.ops import attention_reference as reference  # noqa: E402
from fastgim.ops import attention_triton  # noqa: E402
from fastgim.settings import AttentionGIM  # noqa: E402

pytest.importorskip("triton")

GIM_ON = AttentionGIM(temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5)
GIM_OFF = AttentionGIM()
EPS = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
GRAD_NAMES = ("dq", "dk", "dv", "dgate")

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
_too_late = pytest.mark.skipif(
    not GPU and _TOO_LATE,
    reason="triton.language was imported before TRITON_INTERPRET=1 was set; set TRITON_INTERPRET=1 in the "
           "environment (or in tests/conftest.py) to run the Triton interpreter tests",
)


def interpreter(test):
    """Marks a CPU-matrix test (Triton interpreter without a GPU, real kernels with one)."""
    return pytest.mark.interpreter(_too_late(test))


@dataclasses.dataclass
class Case:
    batch: int = 2
    hq: int = 2
    hkv: int = 1
    lq: int = 33
    lk: int = 33
    dim: int = 64
    dim_v: int | None = None
    causal: bool = True
    mask: str | None = None  # None, "pad", "bool4d", "float4d"
    window: int | None = None
    softcap: float | None = None
    gate: bool = False
    strided: bool = False


FEATURES = {
    "bidirectional": Case(causal=False, lq=29, lk=29),
    "causal": Case(),
    "decode": Case(lq=1, lk=45),
    "causal_lq_lt_lk": Case(lq=17, lk=50),
    "causal_lq_gt_lk": Case(lq=40, lk=23),
    "pad": Case(mask="pad", causal=False),
    "pad_causal": Case(mask="pad"),
    "bool4d": Case(mask="bool4d", causal=False),
    "float4d": Case(mask="float4d"),
    "window_causal": Case(batch=1, window=9, lq=70, lk=70),
    "window_bidirectional": Case(batch=1, window=7, causal=False, lq=70, lk=70),
    "softcap": Case(softcap=3.0),
    "gate": Case(gate=True),
    "strided": Case(strided=True, mask="pad"),
    "dim80": Case(dim=80),
    "dim96": Case(dim=96, causal=False),
    "dim_v_differs": Case(dim=32, dim_v=48),
}


def _tensor(shape, dtype, strided):
    """Fresh random tensor; ``strided`` gives a (B, H, L, D) view of a (B, L, H, D) buffer."""
    if strided:
        b, h, length, d = shape
        return torch.randn(b, length, h, d, device=DEVICE).to(dtype).transpose(1, 2)
    return torch.randn(shape, device=DEVICE).to(dtype)


def _mask(case: Case, dtype):
    if case.mask is None:
        return None
    if case.mask == "pad":
        keep = torch.rand(case.batch, case.lk, device=DEVICE) > 0.3
        keep[:, -1] = True
        return keep
    if case.mask == "bool4d":  # broadcast over heads
        keep = torch.rand(case.batch, 1, case.lq, case.lk, device=DEVICE) > 0.4
        keep[0, 0, 0] = False  # a fully masked row
        return keep
    add = -3.0 * torch.rand(1, case.hq, case.lq, case.lk, device=DEVICE)
    add[..., ::5] = torch.finfo(dtype).min  # HF-style "masked" without -inf
    return add.to(dtype)


def _inputs(case: Case, dtype):
    dim_v = case.dim_v or case.dim
    q = _tensor((case.batch, case.hq, case.lq, case.dim), dtype, case.strided)
    k = _tensor((case.batch, case.hkv, case.lk, case.dim), dtype, case.strided)
    v = _tensor((case.batch, case.hkv, case.lk, dim_v), dtype, case.strided)
    gate = None
    if case.gate:
        gate = torch.rand(case.batch, case.hq, device=DEVICE).to(dtype) + 0.25
        gate[0, 1] = 0.0  # the gate gradient must be right for a closed gate
    dout = torch.randn(case.batch, case.hq, case.lq, dim_v, device=DEVICE).to(dtype)
    return q, k, v, gate, _mask(case, dtype), dout


def _reference(case, gim, tensors, dtype, upcast):
    q, k, v, gate, mask, dout = (None if t is None else t.to(dtype) if t.is_floating_point() else t
                                 for t in tensors)
    options = dict(attention_mask=mask, gate=gate, causal=case.causal, scale=case.dim ** -0.5,
                   sliding_window=case.window, softcap=case.softcap, temperature=gim.temperature)
    out, lse, o_t, lse_t = reference.forward(q, k, v, want_gim_stats=False, upcast=upcast, **options)
    grads = reference.backward(dout, q, k, v, out, lse, o_t, lse_t, q_scale=gim.q_scale, k_scale=gim.k_scale,
                               v_scale=gim.v_scale, upcast=upcast, **options)
    return {"out": out, "lse": lse, **dict(zip(GRAD_NAMES, grads))}


def _triton(case, gim, tensors, backend="triton"):
    q, k, v, gate, mask, dout = (t.detach().clone() if t is not None else None for t in tensors)
    if case.strided:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        assert not q.is_contiguous()
    leaves = [t.requires_grad_() for t in (q, k, v, gate) if t is not None]
    out, lse = fastgim.attention_with_lse(
        q, k, v, causal=case.causal, attention_mask=mask, sliding_window=case.window, softcap=case.softcap,
        gate=gate, gim=gim, backend=backend,
    )
    out.backward(dout)
    result = {"out": out.detach(), "lse": lse.detach()}
    result.update({name: t.grad for name, t in zip(GRAD_NAMES, leaves)})
    return result


def _error(x, ref):
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(x)), "-inf rows differ from the reference"
    return (x[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0


def check_case(case: Case, dtype, gim: AttentionGIM, backend: str = "triton") -> None:
    """``backend`` (Triton by default) vs float64 reference under the accuracy policy, every output and gradient."""
    tensors = _inputs(case, dtype)
    exact = _reference(case, gim, tensors, torch.float64, upcast=True)
    same = _reference(case, gim, tensors, dtype, upcast=False)
    got = _triton(case, gim, tensors, backend)
    for name, ref in exact.items():
        if ref is None:
            assert got.get(name) is None
            continue
        assert got[name].dtype == (torch.float32 if name == "lse" else dtype), name
        assert got[name].shape == ref.shape, name
        assert not got[name].isnan().any(), f"{name} has NaN"
        factor = 2.0 if name in ("out", "lse") else 3.0
        scale = ref[torch.isfinite(ref)].abs().max().item() if torch.isfinite(ref).any() else 1.0
        bound = factor * _error(same[name], ref) + EPS[dtype] * max(scale, 1.0)
        err = _error(got[name], ref)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (same-precision reference error " \
                             f"{_error(same[name], ref):.3g})"


# --------------------------------------------------------------------------- CPU / interpreter matrix


@interpreter
@pytest.mark.parametrize("gim", [GIM_ON, GIM_OFF], ids=["gim", "plain"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_features(dtype, feature, gim):
    check_case(FEATURES[feature], dtype, gim)


@interpreter
@pytest.mark.parametrize("feature", ["causal", "gate", "softcap", "float4d", "window_causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("stats_in_forward", [True, False], ids=["optionA", "optionB"])
def test_gim_stats_options(monkeypatch, stats_in_forward, dtype, feature):
    monkeypatch.setattr(attention_triton, "STATS_IN_FORWARD", stats_in_forward)
    check_case(dataclasses.replace(FEATURES[feature], gate=True), dtype, GIM_ON)


@interpreter
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("length", [1, 17, 97])
def test_lengths_and_gqa(length, group):
    check_case(Case(batch=1, hq=4, hkv=4 // group, lq=length, lk=length, gate=True), torch.float16, GIM_ON)


@interpreter
@pytest.mark.parametrize("dim", [128, 256])
def test_large_head_dims(dim):
    check_case(Case(batch=1, hq=2, hkv=1, lq=20, lk=20, dim=dim), torch.float32, GIM_ON)


@interpreter
def test_fully_masked_rows_are_zero():
    case = Case(lq=24, lk=24, mask="pad", causal=True)
    q, k, v, _, _, _ = _inputs(case, torch.float32)
    keep = torch.ones(case.batch, case.lk, dtype=torch.bool, device=DEVICE)
    keep[1] = False
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = fastgim.attention_with_lse(q, k, v, causal=True, attention_mask=keep, gim=GIM_ON, backend="triton")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))


@interpreter
def test_gim_changes_only_the_backward():
    case = Case(lq=19, lk=19)
    q, k, v, _, _, dout = _inputs(case, torch.float32)
    results = []
    for gim in (GIM_ON, GIM_OFF):
        qq = q.clone().requires_grad_()
        out = fastgim.attention(qq, k, v, causal=True, gim=gim, backend="triton")
        out.backward(dout)
        results.append((out.detach(), qq.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert not torch.allclose(results[0][1], results[1][1])


@interpreter
def test_rejects_float64_with_clear_error():
    q = torch.randn(1, 2, 4, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        fastgim.attention(q, q, q, causal=True, backend="triton")


@interpreter
def test_rejects_too_large_head_dim():
    q = torch.randn(1, 1, 4, 320, device=DEVICE)
    with pytest.raises(ValueError, match="maximum 256"):
        fastgim.attention(q, q, q, causal=True, backend="triton")


@interpreter
def test_is_available(monkeypatch):
    assert attention_triton.is_available(DEVICE)
    assert not attention_triton.is_available("meta")
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not attention_triton.is_available("cpu")


@interpreter
@pytest.mark.parametrize("value, expected", [("forward", True), ("backward", False), ("BACKWARD", False)])
def test_stats_env_choice(monkeypatch, value, expected):
    monkeypatch.setenv("FASTGIM_GIM_STATS", value)
    assert attention_triton._stats_in_forward_default() is expected


@interpreter
def test_stats_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("FASTGIM_GIM_STATS", "sometimes")
    with pytest.raises(ValueError, match="FASTGIM_GIM_STATS"):
        attention_triton._stats_in_forward_default()


@interpreter
def test_backend_option_a_returns_stats_only_when_asked():
    case = Case(lq=9, lk=9)
    q, k, v, _, _, _ = _inputs(case, torch.float32)
    options = dict(attention_mask=None, gate=None, causal=True, scale=0.125, sliding_window=None, softcap=None)
    _, _, o_t, lse_t = attention_triton.forward(q, k, v, temperature=2.0, want_gim_stats=True, **options)
    assert o_t.shape == q.shape and lse_t.shape == q.shape[:3]
    _, _, o_t, _ = attention_triton.forward(q, k, v, temperature=1.0, want_gim_stats=True, **options)
    assert o_t.numel() == 0


@interpreter
def test_env_selects_triton_backend(monkeypatch):
    from fastgim.ops.attention import resolve_backend

    monkeypatch.setenv("FASTGIM_BACKEND", "triton")
    assert resolve_backend(torch.device(DEVICE)) == "triton"
    q, k, v, _, _, _ = _inputs(Case(lq=13, lk=13), torch.float32)
    out = fastgim.attention(q, k, v, causal=True)
    expected = fastgim.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@interpreter
def test_explain_on_a_llama_matches_the_torch_backend(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="gim_fused")
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    ids = torch.randint(1, 50, (1, 11), device=DEVICE)
    scores = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTGIM_BACKEND", backend)
        scores[backend] = fastgim.explain(model, ids, target_token_id=3, baseline_token_id=0)
    assert scores["triton"].abs().max() > 0
    torch.testing.assert_close(scores["triton"], scores["torch"], rtol=1e-4, atol=1e-6)


@interpreter
def test_benchmark_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path), "--methods", "gim_fused", "naive_gim"]) == 0
    (written,) = tmp_path.glob("attention-smoke-*.json")
    data = json.loads(written.read_text())
    assert {r["method"] for r in data["results"]} == {"gim_fused", "naive_gim"}
    assert all(r["fwd_bwd_ms"] > 0 and "error" not in r for r in data["results"])
    assert data["environment"]["torch"] == torch.__version__


# --------------------------------------------------------------------------- GPU matrix


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("gim", [GIM_ON, GIM_OFF], ids=["gim", "plain"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_features(dtype, feature, gim):
    check_case(FEATURES[feature], dtype, gim)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("stats_in_forward", [True, False], ids=["optionA", "optionB"])
@pytest.mark.parametrize("dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_head_dims(monkeypatch, dtype, dim, stats_in_forward):
    monkeypatch.setattr(attention_triton, "STATS_IN_FORWARD", stats_in_forward)
    check_case(Case(batch=2, hq=8, hkv=2, lq=1000, lk=1000, dim=dim, gate=True), dtype, GIM_ON)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [4096, 16384])
def test_gpu_long(length, causal):
    # One head: the float64 reference materialises (Lq, Lk) matrices (~2 GiB each at 16k).
    check_case(Case(batch=1, hq=1, hkv=1, lq=length, lk=length, dim=128, causal=causal), torch.bfloat16, GIM_ON)
