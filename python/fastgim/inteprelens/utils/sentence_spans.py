"""``inteprelens.utils.sentence_spans``."""

from fastgim.sentence_spans import (
    aggregate_to_sentences,
    get_sentence_token_spans,
    get_sentence_token_spans_from_pretokenized,
)

__all__ = ["aggregate_to_sentences", "get_sentence_token_spans", "get_sentence_token_spans_from_pretokenized"]
