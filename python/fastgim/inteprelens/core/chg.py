"""``inteprelens.core.chg``."""

from fastgim.chg import CHG

__all__ = ["CHG"]
