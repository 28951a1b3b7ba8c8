"""The attention op (``fastgim.attention``): torch and sdpa backends vs reference, reference vs autograd,
low-precision accuracy policy, custom-op registration, GIM settings plumbing and input errors."""

from __future__ import annotations

import dataclasses
import importlib
import math
import threading

import pytest
import torch
from conftest import make_qkv, max_error

import fastgim
from fastgim.ops import attention_cpu, attention_reference, attention_sdpa, attention_torch
from fastgim.settings import AttentionGIM, GIMSettings, use_settings

F64 = torch.float64
attention_op = importlib.import_module("fastgim.ops.attention")  # the module (fastgim.ops.attention is the function)


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: shapes and features."""

    batch: int = 2
    hq: int = 4
    hkv: int = 2
    lq: int = 37
    lk: int = 37
    dim: int = 16
    dim_v: int | None = None
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    mask: str | None = None  # see make_mask
    gate: bool = False
    transposed: bool = False


CASES = {
    "causal": Case(),
    "bidirectional": Case(causal=False),
    "pad2d_full_row": Case(mask="pad2d", causal=False),
    "pad2d_int_causal": Case(mask="pad2d_int"),
    "bool4d_batch_broadcast": Case(mask="bool4d_bcast", causal=False),
    "bool4d_per_head_causal": Case(mask="bool4d_head"),
    "bool4d_expanded_gqa": Case(mask="bool4d_expand", hq=6, hkv=2, causal=False),
    "float4d": Case(mask="float4d", causal=False),
    "float4d_one_row": Case(mask="float4d_row", lq=19, lk=41),
    "gqa4": Case(hq=8, hkv=2),
    "gqa8_bidirectional": Case(hq=16, hkv=2, causal=False),
    "mqa": Case(hq=5, hkv=1, lq=23, lk=31),
    "mqa_per_head_mask": Case(hq=3, hkv=1, mask="bool4d_head", causal=False),
    "mha": Case(hq=3, hkv=3),
    "window_causal": Case(window=5, lq=41, lk=41),
    "window_bidirectional": Case(window=4, causal=False),
    "window_cache": Case(window=7, lq=13, lk=50, hq=6, hkv=3),
    "softcap": Case(softcap=3.0),
    "gate": Case(gate=True, hq=6, hkv=2),
    "gate_softcap_pad": Case(gate=True, softcap=2.0, mask="pad2d", causal=False),
    "kv_cache": Case(lq=13, lk=57),
    "decode": Case(lq=1, lk=97, hq=8, hkv=2),
    "lq_gt_lk": Case(lq=40, lk=23),
    "single": Case(batch=1, hq=1, hkv=1, lq=1, lk=1),
    "odd_97": Case(batch=1, lq=97, lk=97, dim=24),
    "odd_257": Case(batch=1, hq=2, hkv=1, lq=257, lk=257, dim=8, window=100),
    "transposed": Case(transposed=True, mask="pad2d", gate=True),
    "dim64": Case(dim=64, causal=False),
    "dim80_dv48": Case(dim=80, dim_v=48),
}

GIMS = {
    "off": False,
    "default": GIMSettings(),
    "temperature_only": GIMSettings(q_scale=None, k_scale=None, v_scale=None),
    "temperature_3": AttentionGIM(temperature=3.0),
    "scales_only": GIMSettings(softmax_temperature=None),
}


def make_mask(case: Case, dtype: torch.dtype) -> torch.Tensor | None:
    """A random mask of the case's kind; the 4D ones and pad2d include a fully masked row."""
    b, h, lq, lk = case.batch, case.hq, case.lq, case.lk
    if case.mask is None:
        return None
    if case.mask in ("pad2d", "pad2d_int"):
        keep = torch.rand(b, lk) > 0.3
        keep[:, -1] = True
        keep[-1] = False  # the last batch row is fully padded
        return keep.long() if case.mask == "pad2d_int" else keep
    shapes = {"bool4d_bcast": (1, 1, lq, lk), "bool4d_expand": (1, 1, lq, lk), "bool4d_head": (b, h, lq, lk),
              "float4d": (b, h, lq, lk), "float4d_row": (b, 1, 1, lk)}
    shape = shapes[case.mask]
    keep = torch.rand(shape) > 0.4
    if case.mask != "float4d_row":
        keep[..., 0, :] = False  # query 0 sees nothing
    if case.mask == "bool4d_expand":  # a stride-0 view over batch and heads
        return keep.expand(b, h, lq, lk)
    if case.mask.startswith("bool"):
        return keep
    return (torch.randn(shape, dtype=dtype) * 0.5).masked_fill(~keep, float("-inf"))


def make_inputs(case: Case, dtype: torch.dtype = F64):
    q, k, v = make_qkv(case.batch, case.hq, case.hkv, case.lq, case.lk, case.dim, case.dim_v, dtype=dtype,
                       transposed=case.transposed, requires_grad=True)
    gate = (torch.rand(case.batch, case.hq, dtype=dtype) + 0.25).requires_grad_() if case.gate else None
    options = dict(causal=case.causal, sliding_window=case.window, softcap=case.softcap,
                   attention_mask=make_mask(case, dtype), gate=gate)
    return q, k, v, gate, options


def run_op(q, k, v, gate, options, gim, backend, dout):
    """Output, LSE and the gradients of ``sum(out * dout)`` (q, k, v, gate) through ``fastgim``."""
    out, lse = fastgim.attention_with_lse(q, k, v, gim=gim, backend=backend, **options)
    inputs = [t for t in (q, k, v, gate) if t is not None]
    grads = torch.autograd.grad(out, inputs, dout)
    return (out, lse, *grads)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 8 query rows, so that small problems still run the multi-block paths."""
    monkeypatch.setattr(attention_torch, "BLOCK_BUDGET_BYTES", 1)
    monkeypatch.setattr(attention_torch, "MIN_BLOCK_ROWS", 8)


SOFTCAP_ERROR = "sdpa attention backend cannot apply a logit softcap"


def without_softcap(case: Case, backend: str) -> Case:
    """The sdpa backend refuses softcap (tested on its own): its cases run without one."""
    return dataclasses.replace(case, softcap=None) if backend == "sdpa" else case


# --------------------------------------------------------------------------- torch / sdpa vs reference (float64)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("gim", list(GIMS), ids=list(GIMS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_backend_matches_reference(
    case: str, gim: str, backend: str, small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch: the PyTorch path (the C++ CPU kernel off; :func:`test_cpu_kernel_matches_reference` covers it)."""
    monkeypatch.setattr(attention_cpu, "ENABLED", False)
    spec = CASES[case]
    if backend == "sdpa" and spec.softcap is not None:
        q, k, v, gate, options = make_inputs(spec)
        with pytest.raises(ValueError, match=SOFTCAP_ERROR):
            fastgim.attention(q, k, v, gim=GIMS[gim], backend=backend, **options)
        return
    q, k, v, gate, options = make_inputs(spec)
    dout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=F64)
    expected = run_op(q, k, v, gate, options, GIMS[gim], "reference", dout)
    actual = run_op(q, k, v, gate, options, GIMS[gim], backend, dout)
    names = ["out", "lse", "dq", "dk", "dv", "dgate"]
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert torch.isfinite(a).all() or name == "lse", f"{name} has NaN/inf"
        tol = 2e-6 if name == "lse" else 1e-11  # the LSE is float32 by contract
        assert max_error(a, e) <= tol * (1 + e.abs().nan_to_num(posinf=0, neginf=0).max()), name


def _kernel_serves(case: Case) -> bool:
    return case.mask is None and case.window is None and case.softcap is None and not (
        case.causal and case.lq > case.lk)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the C++ CPU kernel's backward calls; skips where the kernel cannot be loaded here."""
    if not attention_cpu.available():
        pytest.skip(f"no C++ CPU attention kernel here: {attention_cpu.kernel_status()}")
    calls = [0]
    original = attention_cpu.backward

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_cpu, "backward", counted)
    return calls


#: Every case the kernel serves, and some it must leave to the PyTorch path (mask, window, softcap, Lq > Lk).
KERNEL_CASES = ["causal", "bidirectional", "gqa4", "gqa8_bidirectional", "mqa", "mha", "gate", "kv_cache", "decode",
                "single", "odd_97", "dim80_dv48", "transposed", "window_causal", "softcap", "lq_gt_lk"]


@pytest.mark.parametrize("gim", list(GIMS), ids=list(GIMS))
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_cpu_kernel_matches_reference(case: str, gim: str, small_blocks: None, kernel_calls: list[int]) -> None:
    """The torch backend with its C++ CPU backward (float64) against the reference; the kernel runs for
    exactly the problems it serves (no mask, window or softcap) and the PyTorch path takes the rest."""
    q, k, v, gate, options = make_inputs(CASES[case])
    dout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=F64)
    expected = run_op(q, k, v, gate, options, GIMS[gim], "reference", dout)
    actual = run_op(q, k, v, gate, options, GIMS[gim], "torch", dout)
    assert kernel_calls[0] == int(_kernel_serves(CASES[case]))
    for name, a, e in zip(["out", "lse", "dq", "dk", "dv", "dgate"], actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        tol = 2e-6 if name == "lse" else 1e-11
        assert max_error(a, e) <= tol * (1 + e.abs().nan_to_num(posinf=0, neginf=0).max()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_cpu_kernel_agrees_with_torch_path(dtype: torch.dtype, temperature: float, kernel_calls: list[int],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel and PyTorch path agree in float32 / bfloat16 at a size with several default-sized blocks."""
    q, k, v = make_qkv(1, 6, 2, 130, 130, 32, dtype=dtype, requires_grad=True)
    gate = (torch.rand(1, 6) + 0.5).to(dtype).requires_grad_()
    dout = torch.randn(1, 6, 130, 32, dtype=dtype)
    rules = AttentionGIM(temperature=temperature, q_scale=0.5, k_scale=0.25, v_scale=2.0)
    options = dict(causal=True, attention_mask=None, sliding_window=None, softcap=None, gate=gate)
    monkeypatch.setattr(attention_torch, "BLOCK_BUDGET_BYTES", 130 * 4 * 2 * 30)  # 30-row blocks
    kernel = run_op(q, k, v, gate, options, rules, "torch", dout)
    assert kernel_calls[0] == 1
    monkeypatch.setattr(attention_cpu, "ENABLED", False)
    plain_path = run_op(q, k, v, gate, options, rules, "torch", dout)
    assert kernel_calls[0] == 1
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    for a, e in zip(kernel[2:], plain_path[2:]):
        assert max_error(a, e) <= tol * (1 + float(e.abs().max()))


def _subnormal_count(x: torch.Tensor) -> int:
    x = x.float()
    return int(((x != 0) & (x.abs() < torch.finfo(torch.float32).tiny)).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernel_flushes_subnormal_gradients(dtype: torch.dtype, kernel_calls: list[int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients below float32's smallest normal (1.2e-38) come out as zero: subnormal gradients made every
    later GEMM of a CHG update several times slower. The caller's thread keeps its own floating-point mode."""
    q, k, v = make_qkv(1, 4, 2, 33, 33, 32, dtype=dtype, requires_grad=True)
    dout = (torch.randn(1, 4, 33, 32) * 1e-36).to(dtype)
    options = dict(causal=True, attention_mask=None, sliding_window=None, softcap=None, gate=None)
    kernel = run_op(q, k, v, None, options, AttentionGIM(), "torch", dout)
    assert kernel_calls[0] == 1
    monkeypatch.setattr(attention_cpu, "ENABLED", False)
    plain_path = run_op(q, k, v, None, options, AttentionGIM(), "torch", dout)
    assert sum(_subnormal_count(g) for g in plain_path[2:]) > 0  # the problem does produce subnormals
    assert [_subnormal_count(g) for g in kernel[2:]] == [0, 0, 0]
    for a, e in zip(kernel[2:], plain_path[2:]):  # flushing moves nothing above the subnormal range
        assert max_error(a.float(), e.float()) <= 2e-2 * float(e.float().abs().max())
    assert float(torch.tensor(1e-38) / 64) != 0.0  # this thread still computes subnormals


def test_cpu_kernel_status_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by flag, or failing to load: the status says why and the PyTorch path computes the backward."""
    monkeypatch.setattr(attention_cpu, "ENABLED", False)
    assert attention_cpu.kernel_status() == "torch (FASTGIM_CPU_KERNEL=0)"
    monkeypatch.setattr(attention_cpu, "ENABLED", True)
    monkeypatch.setattr(attention_cpu, "_STATUS", [])

    def no_compiler() -> str:
        raise OSError("no C++ compiler")

    monkeypatch.setattr(attention_cpu, "_load", no_compiler)
    assert attention_cpu.kernel_status().startswith("torch (CPU kernel unavailable: OSError: no C++ compiler")
    assert not attention_cpu.available()
    q, k, v = make_qkv(1, 2, 1, 9, 9, 8, dtype=F64, requires_grad=True)
    dout = torch.randn_like(q)
    options = dict(causal=True, attention_mask=None, sliding_window=None, softcap=None, gate=None)
    actual = run_op(q, k, v, None, options, GIMSettings(), "torch", dout)
    expected = run_op(q, k, v, None, options, GIMSettings(), "reference", dout)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rows", [1, 3, 16, 1000])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_block_sizes_agree(rows: int, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any block size gives the same result (row blocks of 1 row up to one block for everything)."""
    monkeypatch.setattr(attention_torch, "BLOCK_BUDGET_BYTES", 1)
    monkeypatch.setattr(attention_torch, "MIN_BLOCK_ROWS", rows)
    case = Case(lq=29, lk=45, window=9, causal=causal, gate=True, mask="pad2d")
    q, k, v, gate, options = make_inputs(case)
    dout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=F64)
    expected = run_op(q, k, v, gate, options, GIMSettings(), "reference", dout)
    actual = run_op(q, k, v, gate, options, GIMSettings(), "torch", dout)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_fully_masked_rows_are_zero_not_nan(backend: str) -> None:
    q, k, v = make_qkv(1, 2, 1, 6, 6, 8, dtype=torch.float32, requires_grad=True)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = fastgim.attention_with_lse(q, k, v, causal=False, attention_mask=mask, backend=backend)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.isneginf(lse[:, :, 2]).all() and torch.isfinite(lse[:, :, [0, 1, 3, 4, 5]]).all()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][:, :, 2], torch.zeros_like(grads[0][:, :, 2]))


def test_causal_skips_hidden_keys_and_blocks_stay_in_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """O(N) memory: a block's score tile fits the budget; causal blocks only visit visible keys."""
    monkeypatch.setattr(attention_torch, "BLOCK_BUDGET_BYTES", 1024 * 1024)
    q, k, _ = make_qkv(1, 4, 2, 1024, 1024, 8)
    plan = attention_torch._make_plan(q, k, True, None, torch.float32)
    blocks = list(plan.blocks())
    assert len(blocks) == 1024 // 64
    for i0, i1, lo, hi in blocks:
        assert plan.hq * (i1 - i0) * (hi - lo) * 4 <= 1024 * 1024  # float32 scores of one block
        assert lo == 0 and hi == i1  # query i sees keys <= i
    visited = sum((i1 - i0) * (hi - lo) for i0, i1, lo, hi in blocks)
    assert visited < 0.6 * 1024 * 1024
    window_plan = attention_torch._make_plan(q, k, True, 64, torch.float32)
    assert all(hi - lo <= 64 + (i1 - i0) for i0, i1, lo, hi in window_plan.blocks())


# --------------------------------------------------------------------------- reference vs independent maths


class _TemperedSoftmax(torch.autograd.Function):
    """Forward ``softmax(S)``; backward with ``P_T = softmax(S / T)``: ``P_T * (g - rowsum(g * P_T))``."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scores,) = ctx.saved_tensors
        probs_t = torch.softmax(scores / ctx.temperature, dim=-1).nan_to_num(0.0)
        return probs_t * (grad - (grad * probs_t).sum(-1, keepdim=True)), None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def naive_attention(q, k, v, gate, *, causal, sliding_window, softcap, attention_mask, gim: AttentionGIM | None):
    """Materialised attention written from the spec; ``gim=None`` uses plain autograd softmax."""
    group = q.shape[1] // k.shape[1]
    if gim is not None:
        q, k, v = _ScaleGrad.apply(q, gim.q_scale), _ScaleGrad.apply(k, gim.k_scale), _ScaleGrad.apply(v, gim.v_scale)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    lq, lk = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    for i in range(lq):
        pos = i + lk - lq
        for j in range(lk):
            if causal and j > pos:
                allowed[i, j] = False
            if sliding_window is not None and (j <= pos - sliding_window or (not causal and j >= pos + sliding_window)):
                allowed[i, j] = False
    allowed = allowed.expand(q.shape[0], q.shape[1], lq, lk)
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        allowed = allowed & attention_mask
    elif attention_mask is not None:
        scores = scores + attention_mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    if gim is None:
        dead = torch.isneginf(scores).all(-1, keepdim=True)
        probs = torch.where(dead, 0.0, torch.softmax(scores.masked_fill(dead, 0.0), dim=-1))
    else:
        probs = _TemperedSoftmax.apply(scores, gim.temperature)
    out = probs @ v
    return out if gate is None else out * gate[:, :, None, None]


REFERENCE_CASES = ["causal", "pad2d_full_row", "bool4d_per_head_causal", "float4d", "gqa4", "window_causal",
                   "window_bidirectional", "softcap", "gate_softcap_pad", "lq_gt_lk", "dim80_dv48"]


@pytest.mark.parametrize("gim", ["off", "default", "temperature_3", "scales_only"])
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_reference_matches_independent_formulation(case: str, gim: str) -> None:
    q, k, v, gate, options = make_inputs(dataclasses.replace(CASES[case], lq=min(CASES[case].lq, 24)))
    dout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=F64)
    settings = GIMS[gim]
    rules = None if settings is False else (settings if isinstance(settings, AttentionGIM) else settings.attention)
    naive = naive_attention(q, k, v, gate, gim=rules, **{n: o for n, o in options.items() if n != "gate"})
    inputs = [t for t in (q, k, v, gate) if t is not None]
    expected = torch.autograd.grad(naive, inputs, dout)
    actual = run_op(q, k, v, gate, options, settings, "reference", dout)
    torch.testing.assert_close(actual[0], naive, rtol=1e-10, atol=1e-12)
    for a, e in zip(actual[2:], expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def test_gim_backward_differs_from_plain() -> None:
    """Sanity: the GIM rules change the gradient (and T alone changes dq, not dv)."""
    q, k, v, gate, options = make_inputs(CASES["causal"])
    dout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=F64)
    plain = run_op(q, k, v, gate, options, False, "torch", dout)
    tempered = run_op(q, k, v, gate, options, AttentionGIM(temperature=2.0), "torch", dout)
    assert torch.equal(plain[0], tempered[0])
    assert max_error(plain[2], tempered[2]) > 1e-3
    torch.testing.assert_close(plain[4], tempered[4], rtol=1e-12, atol=1e-12)
    scaled = run_op(q, k, v, gate, options, AttentionGIM(1.0, 0.25, 0.5, 2.0), "torch", dout)
    for a, e, factor in zip(scaled[2:], plain[2:], (0.25, 0.5, 2.0)):
        torch.testing.assert_close(a, e * factor, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- low-precision accuracy policy


LOW_PRECISION_CASES = ["causal", "gqa4", "gate_softcap_pad", "window_causal", "float4d", "odd_97"]


def _backend_call(module, q, k, v, gate, options, rules: AttentionGIM, dout, **extra):
    common = dict(attention_mask=options["attention_mask"], gate=gate, causal=options["causal"],
                  scale=1.0 / math.sqrt(q.shape[-1]), sliding_window=options["sliding_window"],
                  softcap=options["softcap"], temperature=rules.temperature)
    out, lse, o_t, lse_t = module.forward(q, k, v, want_gim_stats=False, **common, **extra)
    grads = module.backward(dout, q, k, v, out, lse, o_t, lse_t, q_scale=rules.q_scale, k_scale=rules.k_scale,
                            v_scale=rules.v_scale, **common, **extra)
    return [out, *[g for g in grads if g is not None]]


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("gim", ["off", "default"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_accuracy_policy(dtype: torch.dtype, case: str, gim: str, backend: str,
                                       small_blocks: None) -> None:
    """Error vs a float64 reference <= 2x (out) / 3x (grads) the same-precision reference's, plus eps."""
    spec = without_softcap(dataclasses.replace(CASES[case], dim=32), backend)
    q, k, v, gate, options = make_inputs(spec)
    with torch.no_grad():
        q, k, v = (t.detach().to(dtype) for t in (q, k, v))
        gate = None if gate is None else gate.detach().to(dtype)
        if options["attention_mask"] is not None and options["attention_mask"].is_floating_point():
            options["attention_mask"] = options["attention_mask"].to(dtype)
    options["gate"] = None
    rules = GIMSettings().attention if gim == "default" else AttentionGIM()
    dout = torch.randn(q.shape[:-1] + v.shape[-1:], dtype=dtype)
    widen = lambda ts: [t.double() if t.is_floating_point() else t for t in ts]
    mask64 = options["attention_mask"]
    options64 = dict(options, attention_mask=None if mask64 is None else widen([mask64])[0])
    exact = _backend_call(attention_reference, *widen([q, k, v]), None if gate is None else gate.double(),
                          options64, rules, dout.double())
    same_precision = _backend_call(attention_reference, q, k, v, gate, options, rules, dout, upcast=False)
    module = attention_sdpa if backend == "sdpa" else attention_torch
    actual = _backend_call(module, q, k, v, gate, options, rules, dout)
    eps = torch.finfo(dtype).eps
    for index, (a, s, e) in enumerate(zip(actual, same_precision, exact)):
        assert a.dtype == dtype and a.shape == e.shape
        factor = 2.0 if index == 0 else 3.0
        bound = factor * max_error(s, e) + eps * (1.0 + float(e.abs().max()))
        assert max_error(a, e) <= bound, f"tensor {index}: {max_error(a, e):.3g} > {bound:.3g}"


# --------------------------------------------------------------------------- custom op registration


def _forward_args(case: Case, backend: str, *, stats: bool = False):
    q, k, v, gate, options = make_inputs(case, torch.float32)
    mask = options["attention_mask"]
    if mask is not None and mask.dim() == 2:
        mask = mask.bool()
    return (q, k, v, mask, gate, case.causal, 0.3, case.window, case.softcap, 2.0, 0.25, 0.25, 0.5, stats, backend)


OPCHECK_CASES = {
    "gqa_gate_pad": Case(batch=2, hq=4, hkv=2, lq=9, lk=11, dim=8, gate=True, mask="pad2d"),
    "window_softcap_transposed": Case(batch=1, hq=2, hkv=1, lq=7, lk=7, dim=8, window=3, softcap=2.0,
                                      transposed=True),
}


@pytest.mark.parametrize("backend", ["torch", "sdpa", "reference"])
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_forward_and_backward(case: str, backend: str) -> None:
    args = _forward_args(without_softcap(OPCHECK_CASES[case], backend), backend, stats=backend == "sdpa")
    torch.library.opcheck(torch.ops.fastgim.attention_forward.default, args)
    out, lse, o_t, lse_t = torch.ops.fastgim.attention_forward.default(*args)
    q, k, v, mask, gate = args[:5]
    detach = lambda t: None if t is None else t.detach()
    backward_args = (torch.randn_like(out), *map(detach, (q, k, v, out, lse, o_t, lse_t, mask, gate)), *args[5:13],
                     backend)
    torch.library.opcheck(torch.ops.fastgim.attention_backward.default, backward_args)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_torch_compile_fullgraph(backend: str) -> None:
    q, k, v = make_qkv(1, 4, 2, 12, 12, 8, requires_grad=True)
    gate = torch.rand(1, 4, requires_grad=True)

    def fn(q, k, v, gate):
        return fastgim.attention(q, k, v, causal=True, gate=gate, gim=AttentionGIM(2.0, 0.25, 0.25, 0.5),
                                 backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    dout = torch.randn(1, 4, 12, 8)
    expected = torch.autograd.grad(fn(q, k, v, gate), (q, k, v, gate), dout)
    actual = torch.autograd.grad(compiled(q, k, v, gate), (q, k, v, gate), dout)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


# --------------------------------------------------------------------------- GIM settings plumbing


def test_gim_none_reads_the_context() -> None:
    q, k, v = make_qkv(1, 4, 2, 10, 10, 8, requires_grad=True)
    dout = torch.randn(1, 4, 10, 8)
    run = lambda **kw: torch.autograd.grad(fastgim.attention(q, k, v, causal=True, backend="torch", **kw),
                                           (q, k, v), dout)
    explicit_gim, explicit_off = run(gim=GIMSettings()), run(gim=False)
    with use_settings(GIMSettings()):
        from_context = run()
        forced_off = run(gim=False)
    outside = run()
    for a, e in zip(from_context, explicit_gim):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    for a, b, e in zip(outside, forced_off, explicit_off):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        torch.testing.assert_close(b, e, rtol=0, atol=0)
    assert max_error(explicit_gim[0], explicit_off[0]) > 1e-4


def test_settings_are_captured_at_forward_time() -> None:
    q, k, v = make_qkv(1, 4, 2, 10, 10, 8, requires_grad=True)
    dout = torch.randn(1, 4, 10, 8)
    with use_settings(GIMSettings()):
        out = fastgim.attention(q, k, v, causal=True, backend="torch")
    late = torch.autograd.grad(out, (q, k, v), dout)  # backward after leaving the context
    expected = torch.autograd.grad(fastgim.attention(q, k, v, causal=True, backend="torch", gim=GIMSettings()),
                                   (q, k, v), dout)
    for a, e in zip(late, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_threads_do_not_share_settings() -> None:
    q, k, v = make_qkv(1, 4, 2, 10, 10, 8, requires_grad=True)
    dout = torch.randn(1, 4, 10, 8)
    expected = {
        name: torch.autograd.grad(fastgim.attention(q, k, v, causal=True, backend="torch", gim=gim), (q, k, v), dout)
        for name, gim in (("gim", GIMSettings()), ("off", False))
    }
    barrier, results, errors = threading.Barrier(2), {}, []

    def worker(name: str, settings: GIMSettings | None) -> None:
        try:
            with use_settings(settings):
                barrier.wait()  # both threads are inside their contexts now
                out = fastgim.attention(q, k, v, causal=True, backend="torch")
                barrier.wait()
            results[name] = torch.autograd.grad(out, (q, k, v), dout)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=("gim", GIMSettings())),
               threading.Thread(target=worker, args=("off", None))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for name in ("gim", "off"):
        for a, e in zip(results[name], expected[name]):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input


def _bad_call(**overrides):
    q, k, v = make_qkv(2, 4, 2, 6, 6, 8)
    kwargs = dict(q=q, k=k, v=v, causal=True, backend="torch")
    kwargs.update(overrides)
    return fastgim.attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(q=torch.randn(4, 6, 8)), "must be 4D"),
        (dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float64)), "share a dtype"),
        (dict(q=torch.randint(0, 3, (2, 4, 6, 8)), k=torch.randint(0, 3, (2, 2, 6, 8)),
              v=torch.randint(0, 3, (2, 2, 6, 8))), "floating point"),
        (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), "multiple of key/value heads"),
        (dict(k=torch.randn(2, 2, 6, 4)), "head_dim differ"),
        (dict(v=torch.randn(2, 2, 7, 8)), "same heads and length"),
        (dict(attention_mask=torch.ones(2, 7, dtype=torch.bool)), "key-padding mask of shape"),
        (dict(attention_mask=torch.ones(2, 6)), "must be bool or integer"),
        (dict(attention_mask=torch.ones(2, 3, 6, 6, dtype=torch.bool)), "must broadcast"),
        (dict(attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.long)), "bool .True = attend. or an additive"),
        (dict(attention_mask=torch.ones(2, 6, 6, dtype=torch.bool)), "must be 2D"),
        (dict(gate=torch.ones(2, 2)), "gate must have shape"),
        (dict(sliding_window=0), "sliding_window must be >= 1"),
        (dict(softcap=0.0), "softcap must be > 0"),
        (dict(backend="nope"), "unknown attention backend"),
    ],
    ids=["rank", "dtypes", "integer", "gqa_ratio", "head_dim", "kv_length", "mask2d_shape", "mask2d_float",
         "mask4d_shape", "mask4d_int", "mask3d", "gate_shape", "window", "softcap", "backend"],
)
def test_bad_input_raises_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _bad_call(**overrides)


def test_unknown_backend_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTGIM_BACKEND", "nope")
    q, k, v = make_qkv(1, 2, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        fastgim.attention(q, k, v, causal=True)


def test_unavailable_backend_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = make_qkv(1, 2, 1, 4, 4, 8)
    missing = [name for name in ("cuda", "triton") if not attention_op._backend_available(name, q.device)]
    if not missing:
        pytest.skip("every backend accepts CPU tensors here")
    monkeypatch.setenv("FASTGIM_BACKEND", missing[0])
    with pytest.raises(RuntimeError, match="not available"):
        fastgim.attention(q, k, v, causal=True)


def test_bad_gim_argument() -> None:
    q, k, v = make_qkv(1, 2, 1, 4, 4, 8)
    with pytest.raises(TypeError, match="gim must be"):
        fastgim.attention(q, k, v, causal=True, gim="yes", backend="torch")
