"""``inteprelens.core.trainer``."""

from fastgim.adapters import ModelAdapter
from fastgim.chg import CHG, CHGTrainer, MaskedSequenceDataset

__all__ = ["CHGTrainer"]
