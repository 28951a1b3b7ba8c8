"""``inteprelens.core.interventions``."""

from fastgim.adapters import ModelAdapter, get_adapter
from fastgim.interventions import InterventionSpec, TensorTransform, apply_interventions
from fastgim.sites import SiteName

__all__ = ["InterventionSpec", "apply_interventions"]
