"""``inteprelens.api``: :class:`fastgim.lens.LensAPI` and the names inteprelens' module imports."""

from fastgim.adapters import ModelAdapter, get_adapter
from fastgim.chg import CHGDataset, CHGResults, CHGTrainer, MaskedSequenceDataset
from fastgim.lens import LensAPI
from fastgim.scoring import apply_temperature
from fastgim.sites import SiteName
from fastgim.tracing import TokenScores, TraceResult, TransformerTracer

__all__ = ["LensAPI"]
