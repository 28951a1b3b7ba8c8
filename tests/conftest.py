"""Shared pytest fixtures and helpers (generic; import the helpers from ``conftest``)."""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    # The Triton interpreter must be chosen before triton.language is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seeds torch per test from the test's id: every test gets its own random inputs, reproducibly."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


def randn_heads(
    batch: int, heads: int, length: int, dim: int, *, dtype: torch.dtype = torch.float32,
    transposed: bool = False, requires_grad: bool = False,
) -> torch.Tensor:
    """Random ``(batch, heads, length, dim)`` tensor; ``transposed`` makes it a ``(B, L, H, D).transpose(1, 2)``
    view, the non-contiguous layout Hugging Face attention modules pass."""
    if transposed:
        x = torch.randn(batch, length, heads, dim, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, heads, length, dim, dtype=dtype)
    return x.requires_grad_(requires_grad)


def make_qkv(
    batch: int, hq: int, hkv: int, lq: int, lk: int, dim: int, dim_v: int | None = None, *,
    dtype: torch.dtype = torch.float32, transposed: bool = False, requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)`` (``Dv`` defaults to ``D``)."""
    kwargs = dict(dtype=dtype, transposed=transposed, requires_grad=requires_grad)
    return (
        randn_heads(batch, hq, lq, dim, **kwargs),
        randn_heads(batch, hkv, lk, dim, **kwargs),
        randn_heads(batch, hkv, lk, dim if dim_v is None else dim_v, **kwargs),
    )


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference in float64; positions where both are equal infinities count as 0."""
    actual, expected = actual.detach().double(), expected.detach().double()
    same = actual == expected  # handles matching +-inf
    return float(torch.where(same, 0.0, (actual - expected).abs()).max()) if actual.numel() else 0.0
