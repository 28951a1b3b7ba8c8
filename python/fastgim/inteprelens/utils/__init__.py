"""``inteprelens.utils``: the CHG datasets (inteprelens' task formatters and TensorDict are not provided)."""

from fastgim.chg import CHGDataset, MaskedSequenceDataset

__all__ = ["CHGDataset", "MaskedSequenceDataset"]
