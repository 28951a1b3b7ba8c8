"""``inteprelens.utils.ds``."""

from fastgim.chg import CHGDataset, MaskedSequenceDataset

__all__ = ["CHGDataset", "MaskedSequenceDataset"]
