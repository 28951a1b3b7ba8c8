"""``inteprelens.core.probabilities``."""

from fastgim.scoring import (
    apply_temperature,
    gather_token_scores,
    logits_to_log_probs,
    logits_to_probs,
    select_final_token,
)

__all__ = ["apply_temperature", "gather_token_scores", "logits_to_log_probs", "logits_to_probs", "select_final_token"]
