"""``inteprelens.core.chg``."""

from fastgim.adapters import ModelAdapter, get_adapter
from fastgim.chg import CHG

__all__ = ["CHG"]
