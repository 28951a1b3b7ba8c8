"""Sentence token spans and per-sentence aggregation (inteprelens' ``utils.sentence_spans``).

``get_sentence_token_spans(text, sentences, tokenizer)`` maps each sentence to a ``[start, end)``
range of token positions of ``tokenizer(text)``, matching sentences to the text with whitespace runs
collapsed; ``get_sentence_token_spans_from_pretokenized(sentences, tokenizer)`` tokenises each sentence
on its own and concatenates the tokens (for sentences that do not rebuild the text exactly);
``aggregate_to_sentences(values, spans)`` reduces per-token values to one per sentence.
fastgim's :func:`fastgim.chg.sentence_token_spans` (exact substrings, token lists) is the strict variant.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["get_sentence_token_spans", "get_sentence_token_spans_from_pretokenized", "aggregate_to_sentences"]


def _collapse_whitespace(text: str) -> tuple[str, list[int]]:
    """``text`` with whitespace runs as one space (none leading or trailing), and each kept character's index."""
    chars: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        if char.isspace():
            if chars and chars[-1] != " ":
                chars.append(" ")
                origin.append(index)
            continue
        chars.append(char)
        origin.append(index)
    if chars and chars[-1] == " ":
        chars.pop()
        origin.pop()
    return "".join(chars), origin


def get_sentence_token_spans(
    text: str, sentences: list[str], tokenizer: Any, add_special_tokens: bool = False
) -> list[tuple[int, int]]:
    """``[start, end)`` token positions of each sentence in ``tokenizer(text)``; ``(0, 0)`` if not found.

    Sentences are searched in order, each after the previous match, with whitespace collapsed on
    both sides. A token belongs to the span when its characters overlap the sentence's. Needs a
    tokenizer returning offsets (a "fast" tokenizer).
    """
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    if "offset_mapping" not in encoding:
        raise TypeError("get_sentence_token_spans needs a fast tokenizer (return_offsets_mapping)")
    starts = [start for start, _ in encoding["offset_mapping"]]
    ends = [end for _, end in encoding["offset_mapping"]]
    collapsed, origin = _collapse_whitespace(text)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for sentence in sentences:
        wanted, _ = _collapse_whitespace(sentence.strip())
        found = collapsed.find(wanted, cursor) if wanted else -1
        if found < 0:
            spans.append((0, 0))
            continue
        cursor = found + len(wanted)
        char_start, char_end = origin[found], origin[cursor - 1] + 1
        first = bisect.bisect_left(ends, char_start + 1)
        last = bisect.bisect_left(starts, char_end) - 1
        if first < len(ends) and starts[first] < char_end and last >= 0 and ends[last] > char_start:
            spans.append((first, last + 1))
        else:
            spans.append((0, 0))
    return spans


def get_sentence_token_spans_from_pretokenized(sentences: list[str], tokenizer: Any, add_special_tokens: bool = False
                                               ) -> tuple[Tensor, list[tuple[int, int]]]:
    """``(input_ids (L,) int64, spans)``: each sentence tokenised alone, the tokens concatenated in order.

    ``spans[i]`` is sentence ``i``'s ``[start, end)`` range in ``input_ids``; a blank sentence adds no
    tokens and gets the empty span ``(pos, pos)`` at the current position. ``add_special_tokens=True``
    adds the tokenizer's BOS/EOS to EVERY sentence.
    """
    pieces: list[Tensor] = [torch.zeros(0, dtype=torch.long)]
    spans: list[tuple[int, int]] = []
    position = 0
    for sentence in sentences:
        ids = (tokenizer(sentence, add_special_tokens=add_special_tokens, return_tensors="pt")["input_ids"].reshape(-1)
               if sentence.strip() else pieces[0])
        pieces.append(ids)
        spans.append((position, position + len(ids)))
        position += len(ids)
    input_ids = torch.cat(pieces)
    return input_ids, spans


def aggregate_to_sentences(token_values: Tensor, spans: Sequence[tuple[int, int]], aggregation: str = "mean"
                           ) -> Tensor:
    """One value per span: ``"mean"``, ``"sum"`` or ``"max"`` of ``token_values[start:end]`` (0 for empty spans).

    ``token_values`` is ``(seq_len,)``; returns ``(len(spans),)`` in its dtype.
    """
    reducers = {"mean": torch.mean, "sum": torch.sum, "max": torch.max}
    if aggregation not in reducers:
        raise ValueError(f"aggregation must be 'mean', 'sum' or 'max', got {aggregation!r}")
    values = []
    for start, end in spans:
        part = token_values[max(0, start):min(len(token_values), end)] if start < end else token_values[:0]
        values.append(reducers[aggregation](part) if len(part) else token_values.new_tensor(0.0))
    return torch.stack(values) if values else token_values.new_empty((0,))
