"""Triton norm / gated-activation kernels under TRITON_INTERPRET=1 (CPU, fp32 / fp16) and, marked ``gpu``,
the Triton and CUDA kernels on a GPU (bf16 included), against the model classes and float64 references."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # before triton.language is imported (transformers.activations imports it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402

pytest.importorskip("triton")
for _name in ("fastgim.kernels.rms_norm", "fastgim.kernels.layer_norm", "fastgim.kernels.gated_mlp"):
    if _name in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        importlib.reload(sys.modules[_name])  # imported earlier, perhaps without the interpreter

from fastgim.ops.norms import gated_activation, layer_norm, rms_norm  # noqa: E402

CUDA = torch.cuda.is_available()


def _interpreter_active() -> bool:
    """TRITON_INTERPRET=1 took effect: triton.language itself was imported under it."""
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


cpu_interpreter = pytest.mark.skipif(
    CUDA or not _interpreter_active(),
    reason="Triton interpreter tests run on CPU with TRITON_INTERPRET=1 set before triton.language is imported "
    "(set it in the environment or in tests/conftest.py)",
)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

RMS_FAMILIES = [(LlamaRMSNorm, "llama", 0.0), (Gemma3RMSNorm, "gemma", 1.0), (Olmo2RMSNorm, "olmo2", 0.0)]
# (rows shape, hidden): one row, many rows, odd hidden sizes
SHAPES = [((1,), 1), ((1,), 97), ((3, 37), 97), ((2,), 4097), ((1, 1), 257)]
GRAD_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of ``t`` in its dtype, as float64."""
    mant_bits = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[t.dtype]
    min_exp = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}[t.dtype]
    _, exp = torch.frexp(t.double().abs())
    return torch.pow(2.0, (exp - 1).clamp_min(min_exp).double() - mant_bits)


def _assert_forward_close(out: torch.Tensor, expected: torch.Tensor, ref64: torch.Tensor,
                          extra: torch.Tensor | float = 0.0) -> None:
    """fp32: relative error at most 1e-6 (of the row's scale); fp16 / bf16: within one ulp elementwise
    (plus ``extra``, a tolerance from an intermediate rounding of the model's own casting order).

    An element also passes when it is at least as close to the float64 value ``ref64`` as the model's own
    output is (the model's rounding, e.g. a LayerNorm of one element, is not the target).
    """
    assert out.dtype == expected.dtype and out.shape == expected.shape
    diff = (out.double() - expected.double()).abs()
    as_good = (out.double() - ref64).abs() <= (expected.double() - ref64).abs()
    if out.dtype == torch.float32:
        scale = expected.double().abs().amax(-1, keepdim=True).clamp_min(1e-30)
        assert bool(((diff / scale <= 1e-6) | as_good).all()), (diff / scale).max().item()
    else:
        assert bool(((diff <= _ulp(expected) + extra) | as_good).all()), diff.max().item()


def _assert_grad_policy(ours, torch_same, ref64, dtype, scale):
    err = (ours.double() - ref64).abs().max().item()
    base = (torch_same.double() - ref64).abs().max().item()
    assert err <= 3 * base + GRAD_TOL[dtype] * scale + 1e-12, (err, base, scale)


def _rms_case(family, dtype, rows, hidden, device, backend, frozen):
    """Forward vs the model's module; dx / dweight vs float64 with the accuracy policy."""
    cls, cast, offset = family
    module = cls(hidden, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.weight.normal_(0.0, 0.5)
    x = (torch.randn(*rows, hidden, device=device) * 2).to(dtype).requires_grad_()
    weight = module.weight.detach().clone().requires_grad_()
    out = rms_norm(x, weight, 1e-6, weight_offset=offset, cast=cast, frozen=frozen, backend=backend)
    x64 = x.detach().double()
    ref64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (weight.detach().double() + offset)
    extra = 0.0
    if cast == "llama" and dtype != torch.float32:
        # Llama rounds n = x * rstd to x's dtype before the weight multiply: a one-ulp difference in the
        # fp32 statistic can flip that rounding, i.e. one ulp of n, times |w|
        x32 = x.detach().float()
        n_model = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        extra = weight.detach().double().abs() * _ulp(n_model)
    _assert_forward_close(out, module(x), ref64, extra)
    dy = torch.randn_like(out)
    torch.autograd.backward(out, dy)

    def reference(xx, ww, acc):
        x_acc = xx.to(acc)
        rstd = torch.rsqrt(x_acc.pow(2).mean(-1, keepdim=True) + 1e-6)
        rstd = rstd.detach() if frozen else rstd
        return (x_acc * rstd).to(xx.dtype) * (ww + offset), rstd

    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    out64, rstd64 = reference(x64, w64, torch.float64)
    torch.autograd.backward(out64, dy.double())
    xs, ws = (t.detach().clone().requires_grad_() for t in (x, weight))
    torch.autograd.backward(reference(xs, ws, torch.float32)[0], dy)
    natural = (dy.double() * (w64.detach() + offset) * rstd64).abs().max().item()
    _assert_grad_policy(x.grad, xs.grad, x64.grad, dtype, natural)
    _assert_grad_policy(weight.grad, ws.grad, w64.grad, dtype, w64.grad.abs().max().item())


def _ln_case(affine, dtype, rows, hidden, device, backend, frozen):
    x = (torch.randn(*rows, hidden, device=device) * 2 + 1).to(dtype).requires_grad_()
    weight = (torch.randn(hidden, device=device) * 0.5 + 1).to(dtype).requires_grad_() if affine else None
    bias = torch.randn(hidden, device=device).to(dtype).requires_grad_() if affine else None
    out = layer_norm(x, weight, bias, 1e-5, frozen=frozen, backend=backend)
    as64 = [None if t is None else t.detach().double() for t in (x, weight, bias)]
    ref64 = torch.nn.functional.layer_norm(as64[0], (hidden,), as64[1], as64[2], 1e-5)
    _assert_forward_close(out, torch.nn.functional.layer_norm(x, (hidden,), weight, bias, 1e-5), ref64)
    dy = torch.randn_like(out)
    torch.autograd.backward(out, dy)

    def reference(xx, ww, bb, acc):
        x_acc = xx.to(acc)
        mean = x_acc.mean(-1, keepdim=True)
        rstd = torch.rsqrt((x_acc - mean).pow(2).mean(-1, keepdim=True) + 1e-5)
        rstd = rstd.detach() if frozen else rstd
        y = (x_acc - mean) * rstd
        y = y if ww is None else y * ww.to(acc) + bb.to(acc)
        return y.to(xx.dtype)

    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    torch.autograd.backward(reference(*leaves, torch.float64), dy.double())
    same = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    torch.autograd.backward(reference(*same, torch.float32), dy)
    for ours, ts, ref in zip((x, weight, bias), same, leaves):
        if ours is not None:
            scale = (dy.double() * (1.0 if weight is None else weight.detach().double())).abs().max().item()
            _assert_grad_policy(ours.grad, ts.grad, ref.grad, dtype, max(scale, ref.grad.abs().max().item()))


def _gated_case(activation, dtype, shape, device, backend):
    gate = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    up = torch.randn(shape, device=device).to(dtype).requires_grad_()
    out = gated_activation(gate, up, activation=activation, gate_scale=0.5, up_scale=0.25, backend=backend)
    g64, u64 = gate.detach().double(), up.detach().double()
    ref64 = ACT2FN[activation](g64) * u64
    same = ACT2FN[activation](gate.detach()) * up.detach()
    err = (out.double() - ref64).abs().max().item()
    base = (same.double() - ref64).abs().max().item()
    assert err <= 2 * base + GRAD_TOL[dtype] * ref64.abs().max().item() * 0.1 + 1e-7
    dout = torch.randn_like(out)
    torch.autograd.backward(out, dout)
    g64.requires_grad_()
    u64.requires_grad_()
    torch.autograd.backward(ACT2FN[activation](g64) * u64, dout.double())
    gs, us = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    torch.autograd.backward(ACT2FN[activation](gs) * us, dout)
    _assert_grad_policy(gate.grad, gs.grad * 0.5, g64.grad * 0.5, dtype, (g64.grad * 0.5).abs().max().item())
    _assert_grad_policy(up.grad, us.grad * 0.25, u64.grad * 0.25, dtype, (u64.grad * 0.25).abs().max().item())


# --------------------------------------------------------------------------- interpreter (CPU)


@cpu_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("family", RMS_FAMILIES, ids=lambda f: f[1])
def test_triton_rms_norm_interpreter(family, dtype, rows, hidden, frozen):
    _rms_case(family, dtype, rows, hidden, "cpu", "triton", frozen)


@cpu_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_triton_layer_norm_interpreter(affine, dtype, rows, hidden, frozen):
    _ln_case(affine, dtype, rows, hidden, "cpu", "triton", frozen)


@cpu_interpreter
@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(1,), (3, 97), (2, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "gelu", "gelu_new"])
def test_triton_gated_activation_interpreter(activation, dtype, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _gated_case(activation, dtype, shape, "cpu", "triton")


@cpu_interpreter
@pytest.mark.interpreter
def test_triton_llama_promotes_to_fp32_weight():
    module = LlamaRMSNorm(97).float()
    with torch.no_grad():
        module.weight.normal_()
    x = torch.randn(5, 97, dtype=torch.float16)
    out = rms_norm(x, module.weight, 1e-6, backend="triton")
    x64 = x.double()
    ref64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * module.weight.detach().double()
    _assert_forward_close(out, module(x), ref64)


@cpu_interpreter
@pytest.mark.interpreter
def test_triton_rejects_too_wide_rows():
    from fastgim.kernels.rms_norm import MAX_HIDDEN

    with pytest.raises(ValueError, match="backend='torch'"):
        rms_norm(torch.randn(1, MAX_HIDDEN + 1), None, 1e-6, backend="triton")


# --------------------------------------------------------------------------- GPU


def _cuda_backends() -> list[str]:
    from fastgim.ops import cuda_ext

    return ["triton", "cuda"] if CUDA and cuda_ext.is_available() else ["triton"]


GPU_SHAPES = [((1,), 97), ((4, 129), 2048), ((3,), 4097), ((2, 64), 128), ((1,), 8192)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("rows,hidden", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", RMS_FAMILIES, ids=lambda f: f[1])
def test_gpu_rms_norm(family, dtype, rows, hidden, frozen, backend):
    if backend not in _cuda_backends():
        pytest.skip("the fastgim._C extension is not built / buildable here")
    _rms_case(family, dtype, rows, hidden, "cuda", backend, frozen)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("rows,hidden", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_gpu_layer_norm(affine, dtype, rows, hidden, frozen, backend):
    if backend not in _cuda_backends():
        pytest.skip("the fastgim._C extension is not built / buildable here")
    _ln_case(affine, dtype, rows, hidden, "cuda", backend, frozen)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(1,), (4, 97), (8, 11008)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_gpu_gated_activation(activation, dtype, shape):
    _gated_case(activation, dtype, shape, "cuda", "triton")
