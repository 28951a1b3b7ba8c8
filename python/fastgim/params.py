"""Switching parameters' gradients and the training flag off for attribution and gate training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def no_parameter_grads(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off for every parameter of ``model`` in the block; each flag restored after, errors included.

    Attribution needs gradients for activations only; skipping the weight gradients saves their
    matmuls and memory.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` in the block; the model's (and every submodule's) training flag restored after, errors included."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
