"""``inteprelens.core.interventions``."""

from fastgim.interventions import InterventionSpec, apply_interventions

__all__ = ["InterventionSpec", "apply_interventions"]
