"""``inteprelens.taxonomy.masks``."""

from fastgim.chg import CHGResults
from fastgim.chg_compat import HeadTaxonomy

__all__ = ["CHGResults", "HeadTaxonomy"]
