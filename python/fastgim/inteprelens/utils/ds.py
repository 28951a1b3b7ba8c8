"""``inteprelens.utils.ds``."""

from fastgim.chg_data import CHGDataset, MaskedSequenceDataset
from fastgim.tensordict import TensorDict, TensorDictDataset

__all__ = ["CHGDataset", "MaskedSequenceDataset", "TensorDictDataset"]
