"""Switching parameters' gradients and the training flag off for attribution and gate training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from fastgim.model_patches import Undo, shared_patch


def _switch_off(model: nn.Module) -> Undo:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    def restore() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)

    return restore


@contextlib.contextmanager
def no_parameter_grads(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off for every parameter of ``model`` in the block; each flag restored after, errors included.

    Attribution needs gradients for activations only; skipping the weight gradients saves their
    matmuls and memory. Concurrent and nested blocks on one model share one switch: the first
    saves the flags, the last one to leave restores them (:func:`fastgim.model_patches.shared_patch`).
    """
    with shared_patch(model, "no_parameter_grads", lambda: _switch_off(model)):
        yield


def _switch_to_eval(model: nn.Module) -> Undo:
    flags = [(module, module.training) for module in model.modules()]
    model.eval()

    def undo() -> None:  # every submodule's own flag, not one flag for all
        for module, flag in flags:
            module.training = flag

    return undo


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, the previous mode restored by the last concurrent user."""
    with shared_patch(model, "eval_mode", lambda: _switch_to_eval(model)):
        yield
