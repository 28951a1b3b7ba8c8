"""``inteprelens.core.types``."""

from fastgim.tracing import LayerSiteKey, SiteRequest, TokenScores, TraceResult

__all__ = ["LayerSiteKey", "SiteRequest", "TokenScores", "TraceResult"]
