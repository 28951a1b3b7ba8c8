"""Launch helpers shared by the Triton kernel wrappers."""

from __future__ import annotations

import contextlib

import torch


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context that makes ``tensor``'s CUDA device current for a kernel launch.

    Triton launches on the *current* device; without this a layer placed on ``cuda:1`` (``device_map="auto"``)
    would launch on ``cuda:0`` with pointers into another GPU's memory. A no-op for CPU tensors (interpreter).
    """
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
