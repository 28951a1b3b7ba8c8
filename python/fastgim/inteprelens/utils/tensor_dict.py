"""``inteprelens.utils.tensor_dict``."""

from fastgim.tensordict import TensorDict

__all__ = ["TensorDict"]
