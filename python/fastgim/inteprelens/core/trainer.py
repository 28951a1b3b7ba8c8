"""``inteprelens.core.trainer``."""

from fastgim.chg import CHGTrainer

__all__ = ["CHGTrainer"]
