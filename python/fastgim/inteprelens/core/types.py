"""``inteprelens.core.types``."""

from fastgim.scoring import gather_token_scores, logits_to_log_probs, logits_to_probs, select_final_token
from fastgim.sites import SiteName
from fastgim.tracing import LayerSiteKey, SiteRequest, TokenScores, TraceResult

__all__ = ["LayerSiteKey", "SiteRequest", "TokenScores", "TraceResult"]
