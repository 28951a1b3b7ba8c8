"""CPU tests of fastgim.ops.norms on the torch backend: forwards equal the model classes' own forwards bit
for bit; frozen and ordinary backwards against float64 references; gated activation with GIM scales."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # before triton.language is imported (transformers.activations imports it): Triton on CPU = interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.cohere.modeling_cohere import CohereLayerNorm  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm  # noqa: E402
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm  # noqa: E402

from fastgim.ops import norms  # noqa: E402
from fastgim.ops.norms import gated_activation, layer_norm, resolve_norm_backend, rms_norm  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1), (1, 1, 97), (2, 3, 257), (3, 4097)]
# (class, cast, weight_offset, eps)
RMS_FAMILIES = [
    (LlamaRMSNorm, "llama", 0.0, 1e-6),
    (Qwen3RMSNorm, "llama", 0.0, 1e-6),
    (Gemma2RMSNorm, "gemma", 1.0, 1e-6),
    (Gemma3RMSNorm, "gemma", 1.0, 1e-6),
    (Olmo2RMSNorm, "olmo2", 0.0, 1e-5),
]
GRAD_TOL = {torch.float64: 0.0, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _rms_module(cls, hidden, eps, dtype):
    module = cls(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.5)
    return module


def _ln_modules(hidden, dtype):
    affine = torch.nn.LayerNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        affine.weight.normal_(1.0, 0.5)
        affine.bias.normal_(0.0, 0.5)
    cohere = CohereLayerNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        cohere.weight.normal_(1.0, 0.5)
    return {
        "nn.LayerNorm": (affine, affine.weight, affine.bias, 1e-5, "torch"),
        "nn.LayerNorm(no affine)": (torch.nn.LayerNorm(hidden, elementwise_affine=False).to(dtype), None, None,
                                    1e-5, "torch"),
        "OlmoLayerNorm": (OlmoLayerNorm(hidden), None, None, 1e-5, "fp32"),
        "CohereLayerNorm": (cohere, cohere.weight, None, 1e-5, "cohere"),
    }


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", RMS_FAMILIES, ids=lambda f: f[0].__name__)
def test_rms_norm_forward_bit_exact(family, dtype, shape):
    cls, cast, offset, eps = family
    module = _rms_module(cls, shape[-1], eps, dtype)
    x = torch.randn(shape, dtype=dtype) * 3
    out = rms_norm(x, module.weight, eps, weight_offset=offset, cast=cast, backend="torch")
    expected = module(x)
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_llama_promotes_fp32_weight(dtype):
    module = _rms_module(LlamaRMSNorm, 33, 1e-6, torch.float32)
    x = torch.randn(4, 33, dtype=dtype)
    out = rms_norm(x, module.weight, 1e-6)
    assert out.dtype == torch.float32 and torch.equal(out, module(x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["nn.LayerNorm", "nn.LayerNorm(no affine)", "OlmoLayerNorm", "CohereLayerNorm"])
def test_layer_norm_forward_bit_exact(kind, dtype, shape):
    module, weight, bias, eps, cast = _ln_modules(shape[-1], dtype)[kind]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    out = layer_norm(x, weight, bias, eps, cast=cast, backend="torch")
    assert torch.equal(out, module(x))


def test_gpt2_and_bert_layer_norms_bit_exact():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_embd=48, n_layer=1, n_head=2, vocab_size=11, n_positions=8))
    bert = BertModel(BertConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8, vocab_size=11))
    for module in (gpt2.ln_f, gpt2.h[0].ln_1, bert.embeddings.LayerNorm):
        with torch.no_grad():
            module.weight.normal_(1.0, 0.3)
            module.bias.normal_(0.0, 0.3)
        x = torch.randn(2, 5, 48)
        assert torch.equal(layer_norm(x, module.weight, module.bias, module.eps), module(x))


def _rms_reference64(x, weight, offset, eps):
    """float64 RMSNorm output and rstd (a plain function of x, weight)."""
    x64 = x.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    w_eff = None if weight is None else weight.double() + offset
    return (x64 * rstd if w_eff is None else x64 * rstd * w_eff), rstd


def _rms_same_precision(x, weight, offset, eps, frozen):
    """PyTorch in x's dtype (stats in fp32 as the models do), rstd detached when frozen."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    rstd = rstd.detach() if frozen else rstd
    normed = (x32 * rstd).to(x.dtype)
    return normed if weight is None else normed * (weight + offset).to(x.dtype)


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 97), (37, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cast,offset,has_weight", [("llama", 0.0, True), ("gemma", 1.0, True),
                                                    ("olmo2", 0.0, True), ("llama", 0.0, False)])
def test_rms_norm_backward_vs_float64(cast, offset, has_weight, dtype, shape, frozen):
    eps = 1e-6
    x = (torch.randn(shape, dtype=dtype) * 2).requires_grad_()
    weight = (torch.randn(shape[-1]) * 0.5).to(dtype).requires_grad_() if has_weight else None
    dy = torch.randn(shape, dtype=dtype)
    torch.autograd.backward(rms_norm(x, weight, eps, weight_offset=offset, cast=cast, frozen=frozen), dy)

    x64 = x.detach().double().requires_grad_()
    w64 = None if weight is None else weight.detach().double().requires_grad_()
    out64, rstd64 = _rms_reference64(x64, w64, offset, eps)
    if frozen:  # by hand: dx = dy * w_eff * rstd, rstd constant
        w_eff = 1.0 if w64 is None else w64.detach() + offset
        dx_ref = dy.double() * w_eff * rstd64.detach()
        torch.autograd.backward(out64, dy.double())
        dw_ref = None if w64 is None else w64.grad
    else:
        torch.autograd.backward(out64, dy.double())
        dx_ref, dw_ref = x64.grad, (None if w64 is None else w64.grad)

    xs = x.detach().clone().requires_grad_()
    ws = None if weight is None else weight.detach().clone().requires_grad_()
    torch.autograd.backward(_rms_same_precision(xs, ws, offset, eps, frozen), dy)
    # the size of dy * w_eff * rstd: the ordinary dx may cancel to ~0 (hidden = 1)
    natural = (dy.double() * (1.0 if w64 is None else w64.detach() + offset) * rstd64.detach()).abs().max().item()
    _assert_grad_policy(x.grad, xs.grad, dx_ref, dtype, scale=natural)
    if has_weight:
        _assert_grad_policy(weight.grad, ws.grad, dw_ref, dtype)


def _assert_grad_policy(ours, torch_same, ref64, dtype, scale=None):
    """FlashAttention's policy: error vs float64 at most 3x that of PyTorch in the same precision."""
    err = (ours.double() - ref64).abs().max().item()
    base = (torch_same.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item() if scale is None else scale
    assert err <= 3 * base + GRAD_TOL[dtype] * scale + 1e-12, (err, base, scale)


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 97), (37, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_backward_vs_float64(affine, dtype, shape, frozen):
    hidden = shape[-1]
    eps = 1e-5
    x = (torch.randn(shape, dtype=dtype) * 2 + 1).requires_grad_()
    weight = (torch.randn(hidden) * 0.5 + 1).to(dtype).requires_grad_() if affine != "none" else None
    bias = torch.randn(hidden).to(dtype).requires_grad_() if affine == "weight+bias" else None
    dy = torch.randn(shape, dtype=dtype)
    torch.autograd.backward(layer_norm(x, weight, bias, eps, frozen=frozen), dy)

    def same_precision(xx, ww, bb, dtype_):
        acc = torch.promote_types(dtype_, torch.float32)  # fp32 statistics, as the models; fp64 for the reference
        mean = xx.to(acc).mean(-1, keepdim=True)
        var = (xx.to(acc) - mean).pow(2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        rstd = rstd.detach() if frozen else rstd
        out = (xx.to(acc) - mean) * rstd
        out = out if ww is None else out * ww.to(acc)
        out = out if bb is None else out + bb.to(acc)
        return out.to(dtype_)

    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    torch.autograd.backward(same_precision(*leaves, torch.float64), dy.double())
    same = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    torch.autograd.backward(same_precision(*same, dtype), dy)
    if frozen:  # the mean's gradient kept, the std's dropped: dx = (g - mean(g)) * rstd
        x64 = x.detach().double()
        g = dy.double() * (1.0 if weight is None else weight.detach().double())
        rstd = torch.rsqrt((x64 - x64.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + eps)
        expected_dx = (g - g.mean(-1, keepdim=True)) * rstd
        assert torch.allclose(leaves[0].grad, expected_dx, rtol=1e-9, atol=1e-12)
    for ours, ts, ref in zip((x, weight, bias), same, leaves):
        if ours is not None:
            _assert_grad_policy(ours.grad, ts.grad, ref.grad, dtype)


ACTS = ["silu", "gelu_pytorch_tanh", "gelu", "gelu_new"]


@pytest.mark.parametrize("shape", [(1,), (3, 97), (2, 5, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_gated_activation_forward_bit_exact(activation, dtype, shape):
    gate = torch.randn(shape, dtype=dtype) * 3
    up = torch.randn(shape, dtype=dtype)
    out = gated_activation(gate, up, activation=activation, backend="torch")
    assert torch.equal(out, ACT2FN[activation](gate) * up)


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 0.5), (0.25, 2.0)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_gated_activation_backward_scales(activation, dtype, scales):
    gate_scale, up_scale = scales
    gate = (torch.randn(4, 97, dtype=dtype) * 3).requires_grad_()
    up = torch.randn(4, 97, dtype=dtype).requires_grad_()
    dout = torch.randn(4, 97, dtype=dtype)
    out = gated_activation(gate, up, activation=activation, gate_scale=gate_scale, up_scale=up_scale)
    torch.autograd.backward(out, dout)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    torch.autograd.backward(ACT2FN[activation](g64) * u64, dout.double())
    gs, us = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    torch.autograd.backward(ACT2FN[activation](gs) * us, dout)
    _assert_grad_policy(gate.grad, gs.grad * gate_scale, g64.grad * gate_scale, dtype)
    _assert_grad_policy(up.grad, us.grad * up_scale, u64.grad * up_scale, dtype)


def test_ops_pass_opcheck():
    x = torch.randn(3, 17)
    w = torch.randn(17)
    b = torch.randn(17)
    torch.library.opcheck(norms._rms_norm_forward_op, (x.requires_grad_(), w.requires_grad_(), 1e-6, 1.0,
                                                       "gemma", True, "torch"))
    torch.library.opcheck(norms._layer_norm_forward_op, (x, w, b.requires_grad_(), 1e-5, "torch", True, "torch"))
    gate, up = torch.randn(3, 17, requires_grad=True), torch.randn(3, 17, requires_grad=True)
    torch.library.opcheck(norms._gated_forward_op, (gate, up, "silu", 0.5, 0.5, "torch"))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 3, 64, requires_grad=True)
    w = torch.randn(64)
    fn = torch.compile(lambda t: rms_norm(t, w, 1e-6, frozen=True).sum(), fullgraph=True, backend="aot_eager")
    fn(x).backward()
    assert torch.allclose(x.grad, w * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-6))


def test_errors_name_the_problem(monkeypatch):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="cast"):
        rms_norm(x, torch.ones(8), 1e-6, cast="mistral")
    with pytest.raises(ValueError, match="hidden size 8"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="weight_offset needs a weight"):
        rms_norm(x, None, 1e-6, weight_offset=1.0)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, None, None, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        gated_activation(x, torch.randn(2, 9))
    with pytest.raises(ValueError, match="unknown activation"):
        gated_activation(x, x, activation="relu")
    with pytest.raises(ValueError, match="floating point"):
        rms_norm(torch.ones(2, 8, dtype=torch.long), None, 1e-6)
    monkeypatch.setenv("FASTGIM_NORM_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="unknown norm backend"):
        rms_norm(x, None, 1e-6)
    monkeypatch.setenv("FASTGIM_NORM_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not available for cpu"):
        rms_norm(x, None, 1e-6)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_norm_backend(torch.device("cpu"), "triton")


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("FASTGIM_NORM_BACKEND", raising=False)
    assert resolve_norm_backend(torch.device("cpu")) == "torch"
    x = torch.randn(3, 5)
    assert torch.equal(rms_norm(x, None, 1e-6), (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))
    assert torch.equal(layer_norm(x, None, None, 1e-5), F.layer_norm(x, (5,), eps=1e-5))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_frozen_weights_give_same_dx_without_weight_grad(kind, backend, monkeypatch):
    """GIM turns requires_grad off on parameters: dx must not change, and no parameter gradient appears."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if not norms._backend_available("triton", torch.device("cpu")):
            pytest.skip("triton kernels not importable")
        import triton.language as tl

        if type(tl.sum).__name__ != "InterpretedFunction":
            pytest.skip("triton.language was imported before TRITON_INTERPRET=1 was set in this process")
    x = torch.randn(5, 97)
    w, b = torch.randn(97), torch.randn(97)
    dy = torch.randn(5, 97)

    def run(weight_grad):
        xx = x.clone().requires_grad_()
        ww, bb = w.clone().requires_grad_(weight_grad), b.clone().requires_grad_(weight_grad)
        out = (rms_norm(xx, ww, 1e-6, frozen=True, backend=backend) if kind == "rms"
               else layer_norm(xx, ww, bb, 1e-5, frozen=True, backend=backend))
        torch.autograd.backward(out, dy)
        return xx.grad, ww.grad, bb.grad

    dx_with, dw_with, _ = run(True)
    dx_without, dw_without, db_without = run(False)
    assert torch.equal(dx_with, dx_without)
    assert dw_with is not None and dw_without is None and db_without is None


def test_benchmark_smoke_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "norms.py"
    spec = importlib.util.spec_from_file_location("bench_norms", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--repeats", "1", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "norms_cpu_smoke.json").read_text())["results"]
    ops = {r["op"] for r in records}
    assert {"rms_forward", "rms_backward_frozen", "ln_backward_frozen", "gated_backward"} <= ops
    assert all(r["us"] > 0 and r["gbps"] > 0 for r in records)
