"""The ``sdpa`` backend's CUDA kernel choice (run on meta tensors against the aten ops' schemas and meta
kernels) and the automatic fallback from a failing ``triton`` backend (simulated on CPU)."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from conftest import make_qkv
from torch.utils._python_dispatch import TorchDispatchMode

import fastgim
from fastgim.ops import attention_fallback, attention_sdpa, attention_triton
from fastgim.settings import AttentionGIM

attention_op = importlib.import_module("fastgim.ops.attention")
GIM = AttentionGIM(temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5)
FLASH = "aten._scaled_dot_product_flash_attention"
EFFICIENT = "aten._scaled_dot_product_efficient_attention"


# --------------------------------------------------------------------------- CUDA path on meta tensors


class _OpLog(TorchDispatchMode):
    """Records the aten ops a block runs (their schemas and meta kernels check the arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.shapes: dict[str, list[tuple[int, ...]]] = {}  # the tensor arguments of each op's last call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.names.append(name)
        self.shapes[name] = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        return func(*args, **(kwargs or {}))


def _meta_call(dtype, *, hq=8, hkv=2, lq=64, lk=64, dim=64, dim_v=None, causal=True, mask=None, window=None,
               gate=False, temperature=2.0):
    """Forward (with GIM stats) and backward of the sdpa backend on meta tensors; the ops they ran."""
    q, k, v = (t.to("meta", dtype) for t in make_qkv(2, hq, hkv, lq, lk, dim, dim_v))
    options = dict(attention_mask=None if mask is None else mask.to("meta"),
                   gate=torch.ones(2, hq, device="meta", dtype=dtype) if gate else None, causal=causal,
                   scale=dim ** -0.5, sliding_window=window, softcap=None, temperature=temperature)
    with _OpLog() as log:
        out, lse, o_t, lse_t = attention_sdpa.forward(q, k, v, want_gim_stats=True, **options)
        grads = attention_sdpa.backward(torch.empty_like(out), q, k, v, out, lse, o_t, lse_t, q_scale=0.25,
                                        k_scale=0.25, v_scale=0.5, **options)
    return (out, lse, o_t, lse_t), grads, (q, k, v), log


def _assert_shapes(outputs, grads, inputs) -> None:
    out, lse, o_t, lse_t = outputs
    q, k, v = inputs
    assert out.shape == q.shape[:-1] + v.shape[-1:] and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    assert o_t.shape == out.shape and lse_t.shape == lse.shape
    for grad, like in zip(grads[:3], inputs):
        assert grad.shape == like.shape and grad.dtype == like.dtype and grad.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cuda_unmasked_half_runs_flash_with_native_gqa(dtype, causal) -> None:
    outputs, grads, inputs, log = _meta_call(dtype, causal=causal)
    _assert_shapes(outputs, grads, inputs)
    assert log.names.count(FLASH) == 2 and log.names.count(FLASH + "_backward") == 2  # at s and s / T
    assert EFFICIENT not in log.names
    assert log.shapes[FLASH][1][1] == 2  # K keeps its 2 heads (native GQA)


@pytest.mark.parametrize(
    "problem",
    [
        dict(dtype=torch.float32),  # flash has no fp32
        dict(dtype=torch.bfloat16, mask="pad"),
        dict(dtype=torch.bfloat16, mask="float4d"),
        dict(dtype=torch.float16, window=9),
        dict(dtype=torch.bfloat16, lq=13, lk=57),  # causal with a KV cache: bottom-right, through the bias
        dict(dtype=torch.bfloat16, dim=320),  # above flash's head_dim limit
        dict(dtype=torch.float16, dim=80, dim_v=44, mask="pad", gate=True),  # padded head dims, direct gate
    ],
    ids=["fp32", "pad", "float4d", "window", "kv_cache", "dim320", "dims_gate"],
)
def test_cuda_masked_or_fp32_runs_efficient_with_repeated_kv(problem: dict) -> None:
    problem = dict(problem)
    kind = problem.pop("mask", None)
    lq, lk = problem.get("lq", 64), problem.get("lk", 64)
    mask = {None: None, "pad": torch.ones(2, lk, dtype=torch.bool),
            "float4d": torch.zeros(2, 1, lq, lk)}[kind]
    if mask is not None and mask.is_floating_point():
        mask = mask.to(problem["dtype"])
    outputs, grads, inputs, log = _meta_call(mask=mask, **problem)
    _assert_shapes(outputs, grads, inputs)
    assert FLASH not in log.names and log.names.count(EFFICIENT + "_backward") == 2
    q_shape, k_shape, v_shape = log.shapes[EFFICIENT][:3]
    assert k_shape[1] == v_shape[1] == q_shape[1] == 8  # GQA: K/V repeated for the efficient kernel
    assert q_shape[-1] % 8 == 0 and k_shape[-1] == v_shape[-1] == q_shape[-1]  # padded head dims
    if len(log.shapes[EFFICIENT]) > 3:  # the bias: aligned rows, expanded to (B, H, Lq, Lk)
        assert log.shapes[EFFICIENT][3] == (2, 8, lq, lk)


class _CudaOpsOnCpu:
    """``torch.ops.aten`` with the CUDA flash / efficient ops emulated by the CPU flash kernel: their
    signatures, output tuples, LSE padding and the constraints the CUDA kernels impose (asserted)."""

    def __getattr__(self, name):
        return getattr(torch.ops.aten, name)

    @staticmethod
    def _scaled_dot_product_flash_attention(q, k, v, dropout, causal, debug, *, scale):
        assert dropout == 0.0 and q.shape[-1] % 8 == 0 and q.shape[-1] == v.shape[-1] and q.stride(-1) == 1
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, None, None, q.shape[2], k.shape[2], torch.empty(2), torch.empty(()), torch.empty(0)

    @staticmethod
    def _scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout,
                                                     causal, seed, offset, *, scale):
        assert cum_q is None and cum_k is None and (max_q, max_k) == (q.shape[2], k.shape[2])
        assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and dout.stride(-1) == out.stride(-1) == 1
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(q.dtype), 0.0, causal, scale=scale)

    @staticmethod
    def _scaled_dot_product_efficient_attention(q, k, v, bias, with_lse, dropout, causal, *, scale):
        assert with_lse and k.shape[1] == q.shape[1] and q.shape[-1] % 8 == 0  # no GQA in this kernel
        if bias is not None:
            assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) and bias.dtype == q.dtype
            assert bias.stride(-1) == 1 and bias.stride(-2) % 16 == 0
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                              scale=scale)
        lse = torch.nn.functional.pad(lse.float(), (0, -q.shape[2] % 32), value=float("nan"))  # padded rows
        return out, lse, torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.int64)

    @staticmethod
    def _scaled_dot_product_efficient_attention_backward(dout, q, k, v, bias, out, lse, seed, offset, dropout, needs,
                                                         causal, *, scale):
        assert lse.shape[-1] % 32 == 0 and lse.is_contiguous() and list(needs) == [True, True, True, False]
        lse = lse[..., : q.shape[2]].to(q.dtype)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)
        return (*grads, None)


EMULATED_CASES = {
    "gqa_causal": dict(), "pad": dict(mask="pad"), "float4d": dict(mask="float4d", causal=False),
    "window": dict(window=5), "kv_cache": dict(lq=7, lk=19), "dims_gate": dict(dim=20, dim_v=12, gate=True),
}


@pytest.mark.parametrize(("case", "kernels"), [(case, "EFFICIENT") for case in EMULATED_CASES]
                         + [("gqa_causal", "FLASH"), ("dims_gate", "FLASH")])  # flash: unmasked calls only
def test_cuda_wiring_matches_reference_with_emulated_kernels(case: str, kernels: str, monkeypatch) -> None:
    """The CUDA paths' padding, GQA repeat / sum, bias alignment and LSE handling, run numerically."""
    spec = {"causal": True, "lq": 13, "lk": 13, "dim": 16, "dim_v": None, "mask": None, "window": None,
            "gate": False, **EMULATED_CASES[case]}
    chosen = getattr(attention_sdpa, kernels)
    monkeypatch.setattr(attention_sdpa, "_aten", _CudaOpsOnCpu())
    monkeypatch.setattr(attention_sdpa, "choose_kernels", lambda *args, **kwargs: chosen)
    q, k, v = make_qkv(2, 6, 2, spec["lq"], spec["lk"], spec["dim"], spec["dim_v"], dtype=torch.float64,
                       requires_grad=True)
    gate = (torch.rand(2, 6, dtype=torch.float64) + 0.25).requires_grad_() if spec["gate"] else None
    mask = None
    if spec["mask"] == "pad":
        mask = torch.rand(2, spec["lk"]) > 0.3
        mask[1] = False  # a fully padded batch row: dead rows
    elif spec["mask"] == "float4d":
        mask = torch.randn(2, 1, spec["lq"], spec["lk"], dtype=torch.float64)
        mask = mask.masked_fill(torch.rand(mask.shape) > 0.6, float("-inf"))
    options = dict(causal=spec["causal"], attention_mask=mask, sliding_window=spec["window"], gim=GIM)
    inputs = [t for t in (q, k, v, gate) if t is not None]
    dout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=torch.float64)
    results = {}
    for backend in ("sdpa", "reference"):
        out, lse = fastgim.attention_with_lse(q, k, v, gate=gate, backend=backend, **options)
        results[backend] = (out, lse, *torch.autograd.grad(out, inputs, dout))
    for got, want in zip(results["sdpa"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)  # the LSE the backward gets is float32


def test_float32_mask_minimum_with_float16_inputs() -> None:
    """A float32 mask holding finfo(float32).min (Hugging Face style) with float16 inputs: clamped into the
    float16 range, masked keys still get no weight, and a row that is all "minimum" attends as
    softmax(S + c) = softmax(S) (exact; it would be a 0 row if the mask overflowed to -inf)."""
    q, k, v = make_qkv(1, 2, 1, 8, 8, 16, dtype=torch.float16, requires_grad=True)
    minimum = torch.finfo(torch.float32).min
    mask = torch.zeros(1, 1, 8, 8).masked_fill(torch.rand(1, 1, 8, 8) > 0.5, minimum)
    mask[..., 0] = 0.0
    mask[..., 3, :] = minimum
    out = fastgim.attention(q, k, v, causal=False, attention_mask=mask, gim=GIM, backend="sdpa")
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    exact_mask = mask.clone()
    exact_mask[..., 3, :] = 0.0
    want = fastgim.attention(*(t.float() for t in (q, k, v)), causal=False, attention_mask=exact_mask,
                             backend="reference")
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)


def test_kernel_choice_table() -> None:
    choose = attention_sdpa.choose_kernels
    assert choose("cpu", torch.bfloat16, 64, False) is attention_sdpa.CPU
    assert choose("cpu", torch.float32, 64, True) is attention_sdpa.CPU
    assert choose("cuda", torch.bfloat16, 128, False, (9, 0)) is attention_sdpa.FLASH
    assert choose("cuda", torch.bfloat16, 252, False, (8, 0)) is attention_sdpa.FLASH  # padded to 256
    assert choose("cuda", torch.bfloat16, 128, False, (7, 5)) is attention_sdpa.EFFICIENT  # pre-Ampere
    assert choose("cuda", torch.bfloat16, 128, True, (9, 0)) is attention_sdpa.EFFICIENT
    assert choose("cuda", torch.float32, 128, False, (9, 0)) is attention_sdpa.EFFICIENT


def test_refusals_name_the_fix() -> None:
    q = torch.randn(1, 2, 4, 8)
    assert "backend='torch'" in attention_sdpa.unsupported(q, 5.0)
    assert attention_sdpa.unsupported(q, None) is None
    assert attention_sdpa.unsupported(q.double(), None) is None  # float64 runs on CPU
    assert attention_sdpa.is_available("cpu") and not attention_sdpa.is_available("meta")


# --------------------------------------------------------------------------- automatic fallback


@pytest.fixture
def automatic_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes CPU calls pick ``triton`` automatically, as CUDA calls do, with a clean failure record."""
    monkeypatch.delenv("FASTGIM_BACKEND", raising=False)
    monkeypatch.setattr(attention_op, "resolve_backend", lambda device, requested=None: requested or "triton")
    monkeypatch.setattr(attention_fallback, "_FAILURES", {})


def _problem():
    q, k, v = make_qkv(2, 4, 2, 11, 11, 16, requires_grad=True)
    gate = (torch.rand(2, 4) + 0.25).requires_grad_()
    keep = torch.rand(2, 11) > 0.3
    keep[:, -1] = True
    return q, k, v, gate, dict(causal=True, attention_mask=keep, gate=gate, gim=GIM)


def _run(q, k, v, gate, options, backend=None):
    out = fastgim.attention(q, k, v, backend=backend, **options)
    return (out, *torch.autograd.grad(out, (q, k, v, gate), torch.ones_like(out)))


def _out_of_resources(*args, **kwargs):
    triton_errors = pytest.importorskip("triton.runtime.errors")
    raise triton_errors.OutOfResources(262144, 232448, "shared memory")


def _assert_matches_reference(results, q, k, v, gate, options) -> None:
    expected = _run(q, k, v, gate, options, backend="reference")
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_forward_failure_warns_once_and_runs_sdpa(automatic_triton, monkeypatch) -> None:
    monkeypatch.setattr(attention_triton, "forward", _out_of_resources)
    q, k, v, gate, options = _problem()
    with pytest.warns(RuntimeWarning, match=r"OutOfResources.*shared memory.*'sdpa' backend") as caught:
        first = _run(q, k, v, gate, options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        second = _run(q, k, v, gate, options)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    _assert_matches_reference(first, q, k, v, gate, options)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_failure_falls_back_with_the_forwards_outputs(automatic_triton, monkeypatch) -> None:
    """Triton's forward runs (interpreter); its backward fails; sdpa's backward uses Triton's saved O_T."""
    pytest.importorskip("triton")
    if not attention_triton.is_available("cpu"):
        pytest.skip("the Triton interpreter is not enabled (TRITON_INTERPRET=1)")

    def failing_backward(*args, **kwargs):
        raise RuntimeError("PTXAS error: Internal Triton PTX codegen error (simulated)")

    monkeypatch.setattr(attention_triton, "backward", failing_backward)
    q, k, v, gate, options = _problem()
    with pytest.warns(RuntimeWarning, match="PTX codegen error"):
        results = _run(q, k, v, gate, options)
    _assert_matches_reference(results, q, k, v, gate, options)
    assert attention_fallback.automatic("triton", q, v, None) == "sdpa"  # later calls go there directly


def test_softcap_falls_back_to_torch(automatic_triton, monkeypatch) -> None:
    monkeypatch.setattr(attention_triton, "forward", _out_of_resources)
    q, k, v, gate, options = _problem()
    options["softcap"] = 3.0
    with pytest.warns(RuntimeWarning, match="'torch' backend"):
        results = _run(q, k, v, gate, options)
    _assert_matches_reference(results, q, k, v, gate, options)


def test_named_backend_never_falls_back(automatic_triton, monkeypatch) -> None:
    monkeypatch.setattr(attention_triton, "forward", _out_of_resources)
    q, k, v, gate, options = _problem()
    with pytest.raises(Exception, match="shared memory"):
        fastgim.attention(q, k, v, backend="triton", **options)
    monkeypatch.setenv("FASTGIM_BACKEND", "triton")
    with pytest.raises(Exception, match="shared memory"):
        fastgim.attention(q, k, v, **options)
    assert attention_fallback._FAILURES == {}


def test_out_of_memory_is_not_a_kernel_failure(automatic_triton, monkeypatch) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(attention_triton, "forward", out_of_memory)
    q, k, v, gate, options = _problem()
    with pytest.raises(torch.OutOfMemoryError):
        fastgim.attention(q, k, v, **options)


def test_cuda_without_triton_runs_sdpa(monkeypatch) -> None:
    """On CUDA without an importable Triton, automatic calls warn once and run sdpa (torch for softcap)."""
    from types import SimpleNamespace

    monkeypatch.setattr(attention_fallback, "_FAILURES", {})
    monkeypatch.setattr(attention_fallback, "_triton_import_error", lambda: "ModuleNotFoundError: no triton")
    q = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 4, 9, 64))
    with pytest.warns(RuntimeWarning, match="no triton.*'sdpa' backend"):
        assert attention_fallback.automatic("torch", q, q, None) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention_fallback.automatic("torch", q, q, None) == "sdpa"
        assert attention_fallback.automatic("torch", q, q, 30.0) == "torch"  # softcap: sdpa cannot
        cpu = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, shape=(1, 4, 9, 64))
        assert attention_fallback.automatic("torch", cpu, cpu, None) == "torch"  # CPU default unchanged
