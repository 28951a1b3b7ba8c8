"""Attention op, forward + backward: fastgim's backends (GIM backward) vs torch SDPA (plain backward).

Methods (each a forward and a backward of a random ``dO``, causal, GQA):

* ``fastgim-<backend>``: ``fastgim.attention`` on that backend with GIM on (T=2, scales 1/4, 1/4, 1/2);
  ``triton`` / ``cuda`` where a GPU has them, ``torch`` (blockwise, O(N) memory) and ``reference``
  (materialised scores) everywhere;
* ``fastgim-plain``: the default backend with GIM off (ordinary backward), to show GIM's own cost;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (``enable_gqa``), ordinary backward.

CPU: B=1, 4 query / 2 KV heads, head_dim 64, fp32. GPU (``--gpu``): B=1, 32 / 8 heads, head_dim 128,
bf16 (the Llama-3.1-8B attention shape).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fastgim
from fastgim.ops.attention import resolve_backend
from fastgim.settings import AttentionGIM

SUITE = "attention"
LENGTHS = {"cpu": (128, 512, 1024), "gpu": (1024, 4096, 16384, 32768)}
SHAPES = {
    "cpu": {"batch": 1, "q_heads": 4, "kv_heads": 2, "dim": 64, "dtype": torch.float32},
    "gpu": {"batch": 1, "q_heads": 32, "kv_heads": 8, "dim": 128, "dtype": torch.bfloat16},
}
GIM_ON = AttentionGIM(temperature=2.0, q_scale=0.25, k_scale=0.25, v_scale=0.5)
METHODS = ("fastgim-triton", "fastgim-cuda", "fastgim-torch", "fastgim-reference", "fastgim-plain", "sdpa")

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_method(method: str, device: torch.device) -> Attention:
    """The causal attention ``(q, k, v) -> out`` that ``method`` names; skips backends absent on ``device``."""
    if method == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if method == "fastgim-plain":
        backend = resolve_backend(device)
        return lambda q, k, v: fastgim.attention(q, k, v, causal=True, gim=False, backend=backend)
    backend = method.removeprefix("fastgim-")
    if backend == "triton" and device.type == "cpu":
        pytest.skip("Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1), which is not worth timing")
    try:
        resolve_backend(device, backend)
    except (ValueError, RuntimeError) as error:
        pytest.skip(f"backend {backend!r} is not available on {device.type}: {error}")
    return lambda q, k, v: fastgim.attention(q, k, v, causal=True, gim=GIM_ON, backend=backend)


def random_inputs(length: int, device: torch.device, shape: dict) -> tuple[torch.Tensor, ...]:
    """Fresh ``q (B, Hq, N, D)``, ``k, v (B, Hkv, N, D)`` (requiring grad) and ``dO (B, Hq, N, D)``."""
    batch, hq, hkv, dim, dtype = shape["batch"], shape["q_heads"], shape["kv_heads"], shape["dim"], shape["dtype"]
    make = lambda heads: torch.randn(batch, heads, length, dim, device=device, dtype=dtype)
    q, k, v = (make(h).requires_grad_(True) for h in (hq, hkv, hkv))
    return q, k, v, make(hq)


@pytest.mark.parametrize("method", METHODS)
def test_attention_forward_backward(timer, bench, device, method: str, length: int) -> None:
    shape = SHAPES[bench.scale]
    bench.describe(SUITE, {
        "what": "attention op forward + backward, causal, GQA",
        **{key: str(value) if isinstance(value, torch.dtype) else value for key, value in shape.items()},
        "gim": "T=2, q/k/v scales 1/4, 1/4, 1/2 (fastgim-<backend>); ordinary backward (fastgim-plain, sdpa)",
    })
    attend = attention_method(method, device)
    timer.group = f"attention N={length}"
    q, k, v, dout = random_inputs(length, device, shape)

    def forward_backward() -> None:
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(dout)

    row = bench.run(timer, forward_backward, suite=SUITE, method=method, length=length,
                    info={"dtype": str(shape["dtype"]).removeprefix("torch.")})
    if row["status"] == "ok":
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), f"{method}: non-finite gradients"
