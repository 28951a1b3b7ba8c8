"""``inteprelens.core.attribution``."""

from fastgim.chg import CHG, CausalCircuitAttribution
from fastgim.sentence_spans import aggregate_to_sentences

__all__ = ["CausalCircuitAttribution"]
