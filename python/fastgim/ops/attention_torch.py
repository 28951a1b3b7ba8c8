"""Temporary: delegates to the reference until the blockwise backend lands."""
from fastgim.ops.attention_reference import STATS_IN_FORWARD, backward, forward  # noqa: F401
