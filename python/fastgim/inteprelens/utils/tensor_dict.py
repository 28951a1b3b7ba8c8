"""``inteprelens.utils.tensor_dict``."""

from fastgim.tensordict import TensorDict
from fastgim.utils import format_memory_size

__all__ = ["TensorDict"]
