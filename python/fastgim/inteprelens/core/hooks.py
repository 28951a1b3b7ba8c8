"""``inteprelens.core.hooks``."""

from fastgim.hooks import (
    autograd_node_hook,
    capture_backward_pre,
    capture_gradients,
    capture_kwargs_hook,
    tensor_grad_hook,
)

__all__ = ["autograd_node_hook", "capture_backward_pre", "capture_gradients", "capture_kwargs_hook", "tensor_grad_hook"]
