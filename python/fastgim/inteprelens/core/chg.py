"""``inteprelens.core.chg``."""

from fastgim.adapters import ModelAdapter, get_adapter
from fastgim.chg import CHG
from fastgim.utils import cross_entropy

__all__ = ["CHG"]
