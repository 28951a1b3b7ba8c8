"""How the Triton kernels are launched: device guard, grid, 64-bit offsets, autotune keys and config tables.

CPU tests (Triton interpreter). The launch recorders replace the kernels by objects that record what
each launch saw, so these tests check the wrappers without running the kernels (except the 64-bit
offset test, which runs them on views whose row offsets pass 2^31 elements).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.language is imported

import contextlib  # noqa: E402
import inspect  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from fastgim.kernels import attention, gated_mlp, launch, layer_norm, rms_norm  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="records launches of the interpreted kernels")


class _Guards:
    """Stand-in for ``device_guard``: a stack of the devices whose guard is entered."""

    def __init__(self) -> None:
        self.stack: list[torch.device] = []

    def __call__(self, tensor: torch.Tensor) -> contextlib.AbstractContextManager:
        @contextlib.contextmanager
        def guard():
            self.stack.append(tensor.device)
            try:
                yield
            finally:
                self.stack.pop()

        return guard()


class _Recorder:
    """Stand-in for a jit kernel: ``kernel[grid](*args, **meta)`` records the grid and the guards entered."""

    def __init__(self, name: str, guards: _Guards, launches: list) -> None:
        self.name, self.guards, self.launches = name, guards, launches

    def __getitem__(self, grid):
        def launch_(*args, **meta):
            size = grid(meta) if callable(grid) else grid
            self.launches.append((self.name, tuple(size), list(self.guards.stack), meta))

        return launch_


@pytest.fixture
def recorded(monkeypatch):
    """Every kernel of the four modules replaced by a recorder; returns the list of launches."""
    guards, launches = _Guards(), []
    for module in (attention, rms_norm, layer_norm, gated_mlp):
        monkeypatch.setattr(module, "device_guard", guards)
    for kind in attention._KERNELS:
        monkeypatch.setitem(attention._KERNELS, kind, _Recorder(f"attention.{kind}", guards, launches))
    for module, names in ((rms_norm, ["_rms_fwd_kernel", "_rms_bwd_kernel"]),
                          (layer_norm, ["_ln_fwd_kernel", "_ln_bwd_kernel"]),
                          (gated_mlp, ["_gated_fwd_kernel", "_gated_bwd_kernel"])):
        for name in names:
            monkeypatch.setattr(module, name, _Recorder(name, guards, launches))
    return launches


def _attention_launches(batch: int = 2, heads: int = 2, length: int = 5, dim: int = 16) -> None:
    q, k, v = (torch.randn(batch, heads, length, dim) for _ in range(3))
    opts = dict(pad=None, mask=None, gate=None, causal=True, scale=0.25, window=None, softcap=None)
    out, lse, o_t, lse_t = attention.flash_forward(q, k, v, temperature=2.0, stats=True, **opts)
    attention.flash_backward(torch.randn_like(out), q, k, v, out, lse, o_t, lse_t, temperature=2.0,
                             q_scale=1.0, k_scale=1.0, v_scale=1.0, **opts)


def _norm_launches() -> None:
    x, dy = torch.randn(6, 32), torch.randn(6, 32)
    w, b = torch.randn(32), torch.randn(32)
    rms_norm.rms_norm_forward(x, w, 1e-6, 0.0, "llama")
    rms_norm.rms_norm_backward(dy, x, w, torch.ones(6), 0.0, "llama", frozen=True)
    layer_norm.layer_norm_forward(x, w, b, 1e-5, "torch")
    layer_norm.layer_norm_backward(dy, x, w, b, torch.zeros(6), torch.ones(6), frozen=True)
    gated_mlp.gated_forward(x, dy, "silu")
    gated_mlp.gated_backward(x, dy, x, "silu", 1.0, 0.5)


@interpreter_only
def test_every_launch_runs_under_its_tensors_device_guard(recorded):
    _attention_launches()
    _norm_launches()
    names = [name for name, *_ in recorded]
    assert names == ["attention.fwd", "attention.dq", "attention.dkdv", "_rms_fwd_kernel", "_rms_bwd_kernel",
                     "_ln_fwd_kernel", "_ln_bwd_kernel", "_gated_fwd_kernel", "_gated_bwd_kernel"]
    for name, _grid, guards, _meta in recorded:
        assert guards == [torch.device("cpu")], f"{name} launched outside the device guard of its tensors"


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(launch.torch.cuda, "device", FakeDevice)

    class CudaTensor:  # only ``.device`` is read
        device = torch.device("cuda", 1)

    with launch.device_guard(CudaTensor()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch.device_guard(torch.zeros(1)):  # CPU (interpreter): no CUDA call
        pass
    assert entered == [torch.device("cuda", 1)]


@interpreter_only
def test_grid_puts_batch_times_heads_on_axis_0(recorded):
    """66000 batch x heads would overflow grid axis 1 or 2 (65535): the wrappers use a flat 1-D grid."""
    batch, heads, length = 33000, 2, 1
    _attention_launches(batch=batch, heads=heads, length=length, dim=16)
    block_m, block_n = attention._INTERPRET_BLOCKS
    expected = {"attention.fwd": triton.cdiv(length, block_m) * batch * heads,
                "attention.dq": triton.cdiv(length, block_m) * batch * heads,
                "attention.dkdv": triton.cdiv(length, block_n) * batch * heads}
    for name, grid, _guards, _meta in recorded:
        assert grid == (expected[name],), f"{name}: grid {grid}"


def test_flat_grid_refuses_more_programs_than_axis_0_holds():
    assert attention.flat_grid(100, 70000, "BLOCK_M")({"BLOCK_M": 64}) == (2 * 70000,)
    assert attention.flat_grid(0, 8, "BLOCK_M")({"BLOCK_M": 64}) == (0,)
    with pytest.raises(ValueError, match="split the batch"):
        attention.flat_grid(2**26, 2**12, "BLOCK_N")({"BLOCK_N": 32})


def _constexpr_names(kernel) -> set[str]:
    fn = inspect.unwrap(getattr(kernel, "fn", kernel))
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if "constexpr" in str(p.annotation)}


@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_autotune_key_covers_every_feature_constexpr(kind):
    """A config tuned for one specialisation (e.g. plain) must never be reused for another (e.g. GIM)."""
    kernel = attention._KERNELS[kind]
    constexprs = _constexpr_names(kernel)
    assert {"STATS", "GIM", "STATS_FROM_FWD", "HAS_SOFTCAP", "HAS_GATE", "HAS_PAD"} & constexprs
    assert constexprs - {"BLOCK_M", "BLOCK_N"} <= set(attention.TUNE_KEYS[kind])
    assert set(attention.TUNE_KEYS[kind]) <= set(inspect.signature(inspect.unwrap(kernel.fn)).parameters)


@pytest.mark.parametrize("kind, variant", [("fwd", "plain"), ("fwd", "stats"), ("dq", "stats"), ("dkdv", "gim"),
                                           ("dkdv", "gim+extras"), ("dkdv", "fp32")])
def test_autotuner_uses_the_key_and_the_variants_table(monkeypatch, kind, variant):
    monkeypatch.setattr(attention, "INTERPRET", False)
    monkeypatch.setattr(attention, "_TUNED", {})
    monkeypatch.setattr(attention.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tuner, meta = attention._kernel(kind, 128, torch.device("cuda", 0), variant)
    assert meta == {}
    assert list(tuner.keys) == attention.TUNE_KEYS[kind]
    offered = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuner.configs]
    assert offered == attention.config_table(kind, 128, (9, 0), variant)


@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_lengths_are_not_specialised(kind):
    """Each (Lq % 16, Lq == 1) class would otherwise compile the kernel again."""
    kernel = attention._KERNELS[kind]
    if hasattr(kernel, "params"):  # JITFunction
        skipped = {p.name for p in kernel.params if p.do_not_specialize}
    else:  # InterpretedFunction keeps the decorator's arguments
        names = kernel.kwargs.get("do_not_specialize") or []
        skipped = {kernel.arg_names[n] if isinstance(n, int) else n for n in names}
    assert {"Lq", "Lk", "LQ_KEY", "LK_KEY"} <= skipped


def test_variants_pick_the_gim_tables():
    variant = attention.config_variant
    assert variant("fwd", dtype="bf16", stats=True, gim=True, stats_from_fwd=True) == "stats"
    assert variant("fwd", dtype="bf16", stats=False, gim=True, stats_from_fwd=False) == "plain"
    assert variant("dq", dtype="fp16", stats=False, gim=True, stats_from_fwd=False) == "stats"
    assert variant("dq", dtype="fp16", stats=False, gim=True, stats_from_fwd=True) == "plain"
    assert variant("dkdv", dtype="fp16", stats=False, gim=True, stats_from_fwd=True) == "gim"
    assert variant("dkdv", dtype="fp32", stats=False, gim=False, stats_from_fwd=False) == "fp32"
    assert variant("dkdv", dtype="bf16", stats=False, gim=True, stats_from_fwd=False, extras=True) == "gim+extras"
    # a variant without a table of its own falls back to its base table
    assert attention.config_table("fwd", 64, (9, 0), "plain+extras") == attention.config_table("fwd", 64, (9, 0), "plain")


# --------------------------------------------------------------------------- 64-bit offsets


def _huge_row_stride_views(rows: int, dim: int, row_stride: int, count: int, dtype=torch.float16):
    """``count`` (1, 1, rows, dim) views into one lazily allocated buffer, rows ``row_stride`` elements apart,
    so row index x stride passes 2^31 while only a few pages are ever touched."""
    storage = torch.empty((rows - 1) * row_stride + count * dim, dtype=dtype)
    views = [storage.as_strided((1, 1, rows, dim), (0, 0, row_stride, 1), i * dim) for i in range(count)]
    for view in views:
        view.copy_(torch.randn(1, 1, rows, dim))
    return views


@interpreter_only
@pytest.mark.parametrize("mask", [None, "bool4d"])
def test_row_offsets_past_2_pow_31_are_64_bit(mask):
    """Row 2 of q / k / v / dO (and of the dense mask) starts 2^31 elements in: with 32-bit offsets the
    kernels would read another address. The strided call must equal the call on contiguous copies."""
    stride = 2**30
    q, k, v, do = _huge_row_stride_views(3, 16, stride, 4)
    dense = None
    if mask == "bool4d":
        bits = torch.empty(2 * stride + 4, dtype=torch.bool).as_strided((1, 1, 3, 3), (0, 0, stride, 1))
        bits.copy_(torch.tensor([[True, False, True], [True, True, False], [False, True, True]]))
        dense = bits
    opts = dict(pad=None, gate=None, causal=False, scale=0.25, window=None, softcap=None, temperature=2.0)
    grads = dict(q_scale=1.0, k_scale=0.5, v_scale=1.0)

    def run(q, k, v, do, dense):
        out, lse, o_t, lse_t = attention.flash_forward(q, k, v, mask=dense, stats=True, **opts)
        return (out, lse) + attention.flash_backward(do, q, k, v, out, lse, o_t, lse_t, mask=dense, **opts, **grads)[:3]

    strided = run(q, k, v, do, dense)
    contiguous = run(q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous(),
                     None if dense is None else dense.contiguous())
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), strided, contiguous):
        assert torch.equal(a, b), name
