"""inteprelens-compatible pieces of the CHG workflow that differ from fastgim's defaults.

Everything here is reached through an explicit option of fastgim's own classes:

* :func:`inteprelens_tokenize`: ``CHGDataset.from_texts(..., tokenization="inteprelens")``, the
  prompt and target joined by a separator special token (removed again), no BOS, one extra pad column;
* :func:`dataloader_batches`: ``CHGDataset.training_batches(..., order="inteprelens")``, batches drawn by
  a shuffled ``torch.utils.data.DataLoader`` as inteprelens does (the same global-RNG draws);
* :func:`pattern_task_pairs`: the synthetic ``aba`` / ``abb`` prompts of ``CHGDataset.from_pattern_task``;
* :func:`read_inteprelens_masks`: the ``.pt`` files inteprelens writes, for ``CHGResults.load``;
* :class:`HeadTaxonomy`: inteprelens' label enum.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["INTEPRELENS_MARKER", "HeadTaxonomy", "PromptTokenizer", "inteprelens_tokenize", "dataloader_batches", "pattern_task_pairs",
           "read_inteprelens_masks", "marked_tokenizer", "marked_pair"]

INTEPRELENS_MARKER = " <|TARGET|> "
"""The separator inteprelens' ``PromptTokenizer`` puts between prompt and target."""


class HeadTaxonomy(Enum):
    """inteprelens' three head labels (``CHGResults(convention="inteprelens")``)."""

    FACILITATING = "facilitating"
    INTERFERING = "interfering"
    IRRELEVANT = "irrelevant"


def marked_tokenizer(tokenizer: Any, marker: str = INTEPRELENS_MARKER) -> tuple[Any, int]:
    """A copy of ``tokenizer`` with ``marker`` registered as a special token, and the marker's id."""
    marked = copy.deepcopy(tokenizer)
    if marker not in marked.get_vocab():
        marked.add_special_tokens({"additional_special_tokens": [marker]})
    return marked, marked(marker, add_special_tokens=False)["input_ids"][0]


def marked_pair(prompt: str, target: str, marker: str = INTEPRELENS_MARKER) -> str:
    """inteprelens' tokenizer input for a pair: ``prompt.rstrip() + marker + target`` (target space-led)."""
    return prompt.rstrip() + marker + (target if target.startswith(" ") else " " + target)


def inteprelens_tokenize(texts: Sequence[str], targets: Sequence[str], tokenizer: Any, pad_token_id: int,
                         marker: str = INTEPRELENS_MARKER, truncation: bool = True) -> tuple[Tensor, Tensor]:
    """``(input_ids, loss_masks)`` ``(N, L + 1)`` as inteprelens' ``PromptTokenizer.tokenize_batch``.

    Each pair is tokenised as ``prompt.rstrip() + " <|TARGET|> " + target`` (a leading space added to
    the target) without special tokens, with the separator registered as a special token on a
    *copy* of ``tokenizer`` (the caller's tokenizer is not modified); the separator token is then
    removed, and the rows are right-padded plus one extra pad column. ``truncation`` to the tokenizer's
    ``model_max_length`` as inteprelens' ``tokenize_batch`` (its single-pair ``tokenize`` does not truncate).
    """
    marked, marker_id = marked_tokenizer(tokenizer, marker)
    full = [marked_pair(p, t, marker) for p, t in zip(texts, targets)]
    rows = marked(full, padding=False, truncation=truncation, add_special_tokens=False)["input_ids"]
    ids, masks = [], []
    for row in rows:
        cut = row.index(marker_id)
        kept = row[:cut] + row[cut + 1:]
        ids.append(torch.tensor(kept, dtype=torch.long))
        masks.append(torch.tensor([False] * cut + [True] * (len(kept) - cut)))
    input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_token_id)
    loss_masks = torch.nn.utils.rnn.pad_sequence(masks, batch_first=True, padding_value=False)
    return (torch.nn.functional.pad(input_ids, (0, 1), value=pad_token_id),
            torch.nn.functional.pad(loss_masks, (0, 1), value=False))


class PromptTokenizer:
    """inteprelens' ``PromptTokenizer``: prompt / target pairs to ``(input_ids, loss_masks)`` its way.

    Unlike inteprelens, the separator token is added to a copy of ``tokenizer``, not to ``tokenizer``.
    """

    def __init__(self, tokenizer: Any, device: str = "cpu", marker: str = INTEPRELENS_MARKER) -> None:
        self.tokenizer, self.device = tokenizer, device
        self.marker = (marker if marker.startswith(" ") else " " + marker).rstrip() + " "

    def tokenize_batch(self, prompts: list[str], targets: list[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, loss_masks)`` ``(N, L + 1)``: :func:`inteprelens_tokenize`."""
        pad = self.tokenizer.pad_token_id
        ids, masks = inteprelens_tokenize(prompts, targets, self.tokenizer, pad, self.marker)
        return ids.to(self.device), masks.to(self.device)

    def tokenize(self, prompt: str, target: str) -> tuple[Tensor, Tensor]:
        """One pair, unpadded: ``(input_ids (L,), loss_mask (L,))``."""
        ids, masks = inteprelens_tokenize([prompt], [target], self.tokenizer, -1, self.marker, truncation=False)
        keep = ids[0] != -1
        return ids[0, keep].to(self.device), masks[0, keep].to(self.device)


def dataloader_batches(count: int, batch_size: int, shuffle: bool) -> Iterator[Tensor]:
    """Endless index batches from a fresh ``DataLoader(range(count), batch_size, shuffle)`` per epoch."""
    while True:
        yield from torch.utils.data.DataLoader(range(count), batch_size=batch_size, shuffle=shuffle)


def _pattern_pool(tokenizer: Any, use_vocab_tokens: bool, vocab_size: int) -> list[str]:
    if use_vocab_tokens:
        def valid(token: str, index: int) -> bool:
            clean = token.lstrip("▁").lstrip("Ġ")
            return (index < tokenizer.vocab_size and len(clean) >= 2 and clean.isalpha()
                    and not token.startswith("<") and not token.startswith("["))

        pool = list({tok.lstrip("▁").lstrip("Ġ") for tok, idx in tokenizer.get_vocab().items() if valid(tok, idx)})
        if len(pool[:5000]) >= 100:
            return pool[:5000]
    return [chr(ord("A") + i) for i in range(vocab_size)]


def pattern_task_pairs(pattern: str, tokenizer: Any, num_samples: int, num_lines: int = 5,
                       use_vocab_tokens: bool = True, vocab_size: int = 26, seed: int | None = None
                       ) -> tuple[list[str], list[str]]:
    """``(texts, targets)`` of inteprelens' synthetic pattern task.

    Each text has ``num_lines - 1`` complete lines `` a^ b^ a`` (``aba``) or `` a^ b^ b`` (``abb``) and
    an incomplete last line `` a^ b^``; the target completes it. Words come from the tokenizer's
    vocabulary (alphabetic tokens of 2+ letters) or the letters A-Z. Uses Python's ``random``
    (seeded globally with ``seed``, as inteprelens).
    """
    if pattern not in ("aba", "abb"):
        raise ValueError(f"unknown pattern {pattern!r}; use 'aba' (induction) or 'abb' (repetition)")
    if num_samples < 1 or num_lines < 2:
        raise ValueError(f"num_samples must be >= 1 and num_lines >= 2, got {num_samples}, {num_lines}")
    if seed is not None:
        random.seed(seed)
    pool = _pattern_pool(tokenizer, use_vocab_tokens, vocab_size)
    texts, targets = [], []
    for _ in range(num_samples):
        lines = []
        for _ in range(num_lines - 1):
            a, b = random.sample(pool, 2)
            lines.append(f" {a}^ {b}^ {a if pattern == 'aba' else b}")
        a, b = random.sample(pool, 2)
        lines.append(f" {a}^ {b}^")
        texts.append("\n".join(lines))
        targets.append(f" {a}" if pattern == "aba" else f" {b}")
    return texts, targets


def read_inteprelens_masks(path: str | Path) -> tuple[dict[str, Tensor], list | None, dict | None]:
    """``(masks, metrics, model_config)`` from a ``.pt`` file written by inteprelens or fastgim.

    Reads ``CHGTrainer.fit(save_path=...)`` files (``{"none", "positive", "negative"}`` -> gates) and
    ``CHGResults.save`` files (``{"masks": ..., "metrics": ..., "model_config": ...}``). Loaded with
    ``weights_only=True``: tensors, numbers and strings only.
    """
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("masks"), dict):
        return ({k: v for k, v in data["masks"].items() if v is not None}, data.get("metrics"),
                data.get("model_config"))
    if isinstance(data, dict) and any(k in data for k in ("none", "positive", "negative")):
        return {k: v for k, v in data.items() if isinstance(v, Tensor)}, None, None
    raise ValueError(f"{path} is not a CHG mask file: expected a dict with 'none'/'positive'/'negative' gates "
                     "(CHGTrainer save_path) or with 'masks' (CHGResults.save)")
