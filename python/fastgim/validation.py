"""What the library accepts: one check per kind of input, shared by every entry point.

``explain``, ``attribute``, ``evaluate``, ``CHG``, the tracer / ``LensAPI.score`` and
``attribute_dataset`` call these functions, so a bad input gets the same clear message (naming the
problem and the fix) wherever it enters, before any compute and before anything is changed:

* token ids (:func:`token_ids`): integer dtype (never float / bool; text needs a tokenizer), ``[seq]`` or
  ``[batch, seq]``, at least one token, every id in ``[0, vocab)``;
* single token ids (:func:`token_id`: baseline, target, contrast): a Python / tensor integer in
  ``[0, vocab)``; per-row ids (:func:`row_token_ids`): one per batch row;
* attention masks (:func:`attention_mask`): the shape of the ids, only 0 and 1, every row with at
  least one real token;
* positions (:func:`position`): an integer in ``[-length, length)``;
* numbers (:func:`finite_number`): real, finite, optionally positive or non-negative;
* head gates (:func:`gates`): finite and in ``[0, 1]``;
* prompt lists (:func:`texts`): a non-empty sequence of strings (a single ``str`` is refused);
* results (:func:`finite_result`): a non-finite attribution is an error naming the likely cause.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def require_tokenizer(tokenizer: Any, what: str = "text inputs") -> Any:
    """``tokenizer``, or ``ValueError`` saying that ``what`` needs one."""
    if tokenizer is None:
        raise ValueError(f"{what} need a tokenizer: pass tokenizer=<the model's tokenizer> (or give integer token ids)")
    return tokenizer


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, str):
        require_tokenizer(None, f"text inputs ({name}={value[:30]!r})")
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be integer token ids (a list or a tensor), got {type(value).__name__}") from error


def _is_integer_dtype(tensor: torch.Tensor) -> bool:
    return not (tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex())


def check_vocabulary(ids: torch.Tensor, vocab: int, name: str) -> None:
    """``ValueError`` naming the first id of ``ids`` outside ``[0, vocab)``."""
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        raise ValueError(
            f"{name} contains token id {int(ids[bad][0])} outside the model's vocabulary [0, {vocab}); "
            "tokenize with the model's own tokenizer"
        )


def vocabulary_size(model: nn.Module) -> int | None:
    """The number of rows of the model's input embedding (else ``config.vocab_size``; None if neither exists)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def token_ids(value: Any, vocab: int | None, name: str = "input_ids", *, max_dims: int = 2) -> torch.Tensor:
    """``value`` as int64 token ids ``[seq]`` or ``[batch, seq]`` (up to ``max_dims`` dims), every id checked.

    ``vocab`` None skips the vocabulary check (a model without an embedding table).
    """
    ids = _as_tensor(value, name)
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): the input has no tokens; pass at least one")
    if not _is_integer_dtype(ids):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}; pass torch.long ids")
    if not 1 <= ids.dim() <= max_dims:
        shapes = "[seq_len]" if max_dims == 1 else "[seq_len] or [batch, seq_len]"
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(ids.shape)}")
    if vocab is not None:
        check_vocabulary(ids, vocab, name)
    return ids.long()


def token_id(value: Any, vocab: int, name: str) -> int:
    """One token id as a Python int in ``[0, vocab)``; floats (``1.9``), bools and text are refused."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and _is_integer_dtype(value):
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer token id, got {value!r}")
    if not 0 <= int(value) < vocab:
        raise ValueError(f"{name} {int(value)} is outside the model's vocabulary [0, {vocab})")
    return int(value)


def row_token_ids(value: Any, batch: int, vocab: int, name: str, device: torch.device | str = "cpu"
                  ) -> torch.Tensor | None:
    """``None``, or ``[batch]`` int64 ids from an int (the same for every row) or one id per row."""
    if value is None:
        return None
    ids = _as_tensor(value, name)
    if ids.numel() == 0 or not _is_integer_dtype(ids) or ids.dim() > 1 or ids.dim() == 1 and ids.shape[0] != batch:
        raise ValueError(f"{name} must be an int or {batch} integer token ids (one per row), got {value!r}")
    check_vocabulary(ids, vocab, name)
    return ids.long().to(device).expand(batch)


def attention_mask(mask: Any, ids: torch.Tensor) -> torch.Tensor:
    """The boolean ``[batch, seq]`` padding mask for ``ids`` (all ones when ``mask`` is None).

    A ``[seq]`` mask is accepted for ``[1, seq]`` ids. Values must be 0 (padding) or 1 (real token)
    and every row needs a real token (an all-zero row would score a padding position).
    """
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    mask = torch.as_tensor(mask, device=ids.device)
    if mask.dim() == 1 and ids.dim() == 2 and ids.shape[0] == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got {tuple(mask.shape)}; "
            "pass the padding mask the tokenizer returns (1 = real token, 0 = padding)"
        )
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must contain only 0 (padding) and 1 (real token)")
    mask = mask.bool()
    empty = (~mask.any(-1)).nonzero().flatten() if mask.dim() > 1 else (~mask.any()).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"attention_mask row {int(empty[0])} has no real token; every row needs at least one")
    return mask


def position(value: Any, length: int, name: str = "target_position", unit: str = "tokens") -> int:
    """An integer position in ``[-length, length)`` (negative counts from the end); ``unit`` names what is counted."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and _is_integer_dtype(value):
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer position, got {value!r}")
    if not -length <= int(value) < length:
        raise ValueError(
            f"{name} {int(value)} is out of range, outside the input of {length} {unit}; use a value in "
            f"[{-length}, {length - 1}] (-1 = the last token)"
        )
    return int(value)


def finite_number(value: Any, name: str, *, positive: bool = False, non_negative: bool = False) -> float:
    """``value`` as a finite float; ``positive`` / ``non_negative`` add the sign requirement."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not number > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if non_negative and not number >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def gates(values: torch.Tensor, name: str = "head gates") -> torch.Tensor:
    """Head gates: a floating tensor with every value finite and in ``[0, 1]`` (0 = head off, 1 = unchanged)."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(values, 'dtype', type(values))}")
    detached = values.detach()
    if not ((detached >= 0) & (detached <= 1)).all():  # NaN fails both comparisons
        bad = detached[~((detached >= 0) & (detached <= 1))][0]
        raise ValueError(
            f"{name} must be in [0, 1] (0 = head off, 1 = unchanged), got {float(bad)!r}; for trained logits "
            "pass logits.sigmoid()"
        )
    return values


def texts(value: Any, name: str = "texts") -> list[str]:
    """A non-empty list of prompts; one ``str`` is refused (it would run one prompt per character)."""
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of strings, got a single str; pass [{value[:30]!r}]")
    if not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} is empty: give at least one prompt")
    wrong = [i for i, text in enumerate(value) if not isinstance(text, str)]
    if wrong:
        raise TypeError(f"{name}[{wrong[0]}] is {type(value[wrong[0]]).__name__}, not a str")
    return list(value)


def finite_result(values: torch.Tensor, model: nn.Module, what: str = "the attribution",
                  head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` unchanged if finite; else ``FloatingPointError`` naming the likely cause."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return values
    count = int((~finite).sum())
    raise FloatingPointError(
        f"{what} has {count} non-finite value(s) (NaN or inf); likely cause: {_likely_cause(model, head_mask)}"
    )


def _likely_cause(model: nn.Module, head_mask: torch.Tensor | None) -> str:
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter.detach()).all()):
            return f"the model's parameter {name!r} holds NaN or inf values (a broken checkpoint or training run)"
    if head_mask is not None and not bool(torch.isfinite(head_mask.detach()).all()):
        return "head_mask holds NaN or inf values"
    dtype = next(model.parameters(), torch.empty(0)).dtype
    if dtype == torch.float16:
        return "float16 overflow in the model's forward or backward; load the model in bfloat16 or float32"
    return ("the model's outputs or the target score overflowed; check the inputs and the target, or run in "
            "float32")
