"""``inteprelens.utils``: the CHG datasets and PromptTokenizer (inteprelens' task formatters, TensorDict and
general helpers are not provided)."""

from fastgim.chg import CHGDataset, MaskedSequenceDataset
from fastgim.chg_compat import PromptTokenizer

__all__ = ["CHGDataset", "MaskedSequenceDataset", "PromptTokenizer"]
