"""``inteprelens.core.attribution``."""

from fastgim.chg import CausalCircuitAttribution

__all__ = ["CausalCircuitAttribution"]
