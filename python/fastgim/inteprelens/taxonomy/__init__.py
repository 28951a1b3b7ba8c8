"""``inteprelens.taxonomy``."""

from fastgim.inteprelens.taxonomy.masks import CHGResults, HeadTaxonomy

__all__ = ["CHGResults", "HeadTaxonomy"]
