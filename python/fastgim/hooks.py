"""Hook utilities (inteprelens-compatible): context managers that remove their handles on exit.

Every function here is a context manager that yields a list which fills up as the
hooks fire; the hooks are removed when the block is left, exceptions included.
They work on any ``nn.Module`` (HF models on ``"gim_fused"`` included) and inside
``fastgim.GIM`` blocks, where the captured gradients are GIM's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "capture_gradients",
    "capture_backward_pre",
    "capture_kwargs_hook",
    "tensor_grad_hook",
    "autograd_node_hook",
]


def _check_module(module: Any, name: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} expects an nn.Module, got {type(module).__name__}; pass e.g. adapter.get_mlp(0)")


@contextlib.contextmanager
def capture_gradients(
    module: nn.Module, site: Literal["output", "input", "both"] = "output"
) -> Iterator[list[Any]]:
    """Record gradients flowing through ``module`` (``register_full_backward_hook``).

    Yields a list that receives one entry per backward through the module:
    ``site="output"`` -> the ``grad_output`` tuple (e.g. ``grads[0][0]`` is
    ``[batch, seq, hidden]`` for a decoder layer), ``"input"`` -> ``grad_input``,
    ``"both"`` -> ``(grad_input, grad_output)``. Tensors are detached.
    """
    _check_module(module, "capture_gradients")
    if site not in ("output", "input", "both"):
        raise ValueError(f"site must be 'output', 'input' or 'both', got {site!r}")
    records: list[Any] = []

    def _detach(grads: tuple) -> tuple:
        return tuple(None if g is None else g.detach() for g in grads)

    def hook(_module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        if site == "output":
            records.append(_detach(grad_output))
        elif site == "input":
            records.append(_detach(grad_input))
        else:
            records.append((_detach(grad_input), _detach(grad_output)))

    handle = module.register_full_backward_hook(hook)
    try:
        yield records
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_backward_pre(module: nn.Module) -> Iterator[list[tuple[torch.Tensor | None, ...]]]:
    """Record ``grad_output`` entering ``module`` before its backward runs.

    Uses ``register_full_backward_pre_hook``; yields a list of detached
    ``grad_output`` tuples, one per backward through the module.
    """
    _check_module(module, "capture_backward_pre")
    records: list[tuple[torch.Tensor | None, ...]] = []

    def hook(_module: nn.Module, grad_output: tuple) -> None:
        records.append(tuple(None if g is None else g.detach() for g in grad_output))

    handle = module.register_full_backward_pre_hook(hook)
    try:
        yield records
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_kwargs_hook(
    module: nn.Module, modify: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Record (and optionally rewrite) the keyword arguments of ``module``'s forward.

    Uses ``register_forward_pre_hook(with_kwargs=True)``. Yields a list with one
    shallow copy of the kwargs dict per call (e.g. ``kw[0]["attention_mask"]``).
    ``modify(kwargs)`` may return a new kwargs dict that replaces the call's.
    """
    _check_module(module, "capture_kwargs_hook")
    records: list[dict[str, Any]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        records.append(dict(kwargs))
        if modify is None:
            return None
        new_kwargs = modify(dict(kwargs))
        return None if new_kwargs is None else (args, new_kwargs)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield records
    finally:
        handle.remove()


@contextlib.contextmanager
def tensor_grad_hook(
    get_tensor_fn: torch.Tensor | Callable[[], torch.Tensor],
    retain_grad: bool = True,
) -> Iterator[list[torch.Tensor]]:
    """Record the gradient of one activation tensor (``Tensor.register_hook``).

    ``get_tensor_fn`` is a zero-argument callable returning the tensor (useful when
    it is produced by a forward hook) or the tensor itself. It must require grad. Yields a
    list with one detached gradient (same shape as the tensor) per backward through it.
    ``retain_grad`` (default, as inteprelens) also calls ``tensor.retain_grad()`` so that
    ``tensor.grad`` is kept after backward.
    """
    tensor = get_tensor_fn
    target = tensor() if callable(tensor) and not isinstance(tensor, torch.Tensor) else tensor
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"tensor_grad_hook needs a tensor (or a callable returning one), got {type(target).__name__}")
    if not target.requires_grad:
        raise ValueError("tensor_grad_hook: the tensor does not require grad; run the forward with grad enabled")
    if retain_grad:
        target.retain_grad()
    records: list[torch.Tensor] = []
    handle = target.register_hook(lambda grad: records.append(grad.detach()))
    try:
        yield records
    finally:
        handle.remove()


@contextlib.contextmanager
def autograd_node_hook(
    tensor: torch.Tensor | Callable[[], torch.Tensor], pre: bool = False
) -> Iterator[list[Any]]:
    """Hook the autograd node that produced ``tensor`` (``torch.autograd.graph.Node``).

    ``pre=False`` registers ``node.register_hook`` and records
    the gradients; ``pre=True`` registers ``node.register_prehook`` and records
    ``grad_outputs`` only. Each entry is a dict ``{"node": name, "grad_inputs":
    tuple, "grad_outputs": tuple}`` (no ``grad_inputs`` key when ``pre=True``).
    """
    target = tensor() if callable(tensor) and not isinstance(tensor, torch.Tensor) else tensor
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"autograd_node_hook needs a tensor (or a callable returning one), got {type(target).__name__}")
    node = target.grad_fn
    if node is None:
        raise ValueError("autograd_node_hook: the tensor has no grad_fn (a leaf or computed without grad)")
    records: list[Any] = []
    name = node.name()

    def _detach(grads: tuple) -> tuple:
        return tuple(None if g is None else g.detach() for g in grads)

    if pre:

        def prehook(grad_outputs: tuple) -> None:
            records.append({"node": name, "grad_outputs": _detach(grad_outputs)})

        handle = node.register_prehook(prehook)
    else:

        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            records.append({"node": name, "grad_inputs": _detach(grad_inputs), "grad_outputs": _detach(grad_outputs)})

        handle = node.register_hook(hook)
    try:
        yield records
    finally:
        handle.remove()
