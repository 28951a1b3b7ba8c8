"""CHG training data: token rows with a loss mask over the target tokens.

:class:`CHGDataset` is fastgim's dataset (built by its ``from_*`` factories); :class:`MaskedSequenceDataset`
is inteprelens 0.2.1's class of the same data, with its constructor and behaviour. Both are
:class:`~fastgim.tensordict.TensorDictDataset` objects, so inteprelens' dataset API (``dataset["input_ids"]``,
``dataset.input_ids``, ``map``, ``collate_fn``, ``to_dataloader``, ``.to(device)``, ...) works on both, and
both train with :class:`fastgim.CHGTrainer` / ``LensAPI.fit_dataset``.

Left padding (``MaskedSequenceDataset(..., pad_right=False)``): inteprelens' trainer feeds the
left-padded rows to the model as they are, without an attention mask, so each row's loss depends on
how much padding precedes it. fastgim trains on the same rows moved to the left edge (right padding),
which a causal model reads exactly as the unpadded row: the loss of a left-padded dataset equals the
loss of the same rows right-padded. The padding is read from an ``attention_mask`` field when the
dataset has one (0 = padding), else from the leading ``pad_token_id`` tokens of each row; give an
``attention_mask`` when the pad token can also start a real row (for example pad = BOS).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fastgim.tensordict import TensorDict, TensorDictDataset

__all__ = ["CHGDataset", "MaskedSequenceDataset"]


def _pad_token_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _check_texts(texts: Sequence[str], name: str = "texts") -> None:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, not a single string; wrap it in a list")
    if len(texts) == 0:
        raise ValueError(f"{name} is empty: give at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(text).__name__}")


def _check_pairs(texts: Sequence[str], targets: Sequence[str]) -> None:
    if isinstance(texts, str) or isinstance(targets, str):
        raise TypeError("texts and targets must be lists of strings, not single strings; wrap them in a list")
    if len(texts) == 0:
        raise ValueError("texts is empty: give at least one prompt (and one target per prompt)")
    if len(texts) != len(targets):
        raise ValueError(
            f"texts and targets must have the same length (one target per prompt), got {len(texts)} texts "
            f"and {len(targets)} targets"
        )
    for i, (text, target) in enumerate(zip(texts, targets)):
        if not isinstance(text, str) or not isinstance(target, str):
            raise TypeError(f"pair {i}: texts and targets must be strings, got {type(text).__name__}, "
                            f"{type(target).__name__}")


def _check_targets(loss_masks: Tensor, rows: Tensor | None = None) -> None:
    """Each row has a target token and none at column 0 (it would have no context)."""
    def names(bad: Tensor) -> list[int]:
        found = bad.nonzero().flatten()
        return (found if rows is None else rows.flatten()[found]).tolist()[:10]

    if loss_masks[:, 0].any():
        raise ValueError(f"loss_masks[:, 0] must be False: the first token has no preceding context to predict it "
                         f"(rows {names(loss_masks[:, 0])})")
    empty = ~loss_masks.any(dim=1)
    if empty.any():
        raise ValueError(f"samples {names(empty)} have no target token in loss_masks; every sample needs one")


def _checked_rows(input_ids: Tensor, loss_masks: Tensor) -> tuple[Tensor, Tensor]:
    """``(input_ids int64, loss_masks bool)`` after checking the shapes and that every row has a target."""
    if input_ids.dim() != 2 or tuple(loss_masks.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"input_ids and loss_masks must both be (num_samples, seq_len), got {tuple(input_ids.shape)} "
            f"and {tuple(loss_masks.shape)}"
        )
    if input_ids.shape[0] == 0:
        raise ValueError("a CHG dataset needs at least one sample")
    loss_masks = loss_masks.to(torch.bool)
    _check_targets(loss_masks)
    return input_ids.long(), loss_masks


def _target_lengths(loss_masks: Tensor) -> Tensor:
    """``(N,)``: each row's last target column + 1 (later columns cannot change a causal model's loss)."""
    columns = torch.arange(loss_masks.shape[1], device=loss_masks.device).expand_as(loss_masks)
    return columns.masked_fill(~loss_masks, -1).max(dim=1).values + 1


def _moved_left(input_ids: Tensor, loss_masks: Tensor, real: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded rows moved to the left edge: ``real`` ``(N, L)`` is True from each row's first real token."""
    has_real = real.any(dim=1)
    if not has_real.all():
        raise ValueError(f"rows {(~has_real).nonzero().flatten().tolist()[:10]} are all padding; remove them")
    start = real.int().argmax(dim=1, keepdim=True)
    columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    in_padding = loss_masks & (columns < start)
    if in_padding.any():
        raise ValueError(f"loss_masks marks left padding in rows {in_padding.any(1).nonzero().flatten().tolist()[:10]}"
                         "; targets must be real tokens (check pad_right and pad_token_id)")
    source = columns + start
    inside = source < input_ids.shape[1]
    source = source.clamp(max=input_ids.shape[1] - 1)
    return (input_ids.gather(1, source).masked_fill(~inside, pad_token_id),
            loss_masks.gather(1, source) & inside)


def _trimmed_batch(input_ids: Tensor, loss_masks: Tensor, lengths: Tensor, indices: Tensor) -> dict[str, Tensor]:
    width = int(lengths[indices].max())
    return {"input_ids": input_ids[indices, :width], "loss_masks": loss_masks[indices, :width]}


def _endless_batches(input_ids: Tensor, loss_masks: Tensor, lengths: Tensor, batch_size: int, shuffle: bool,
                     seed: int | None) -> Iterator[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    count = input_ids.shape[0]
    while True:
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
        for start in range(0, count, batch_size):
            yield _trimmed_batch(input_ids, loss_masks, lengths, order[start:start + batch_size].to(input_ids.device))


class CHGDataset(TensorDictDataset, torch.utils.data.Dataset):
    """Prompt/target pairs tokenised for CHG: the loss covers the target tokens only.

    Fields (a :class:`~fastgim.tensordict.TensorDictDataset`: ``dataset["input_ids"]`` or
    ``dataset.input_ids``):
        input_ids: ``(N, L)`` int64, right-padded with ``pad_token_id``.
        loss_masks: ``(N, L)`` bool, True at target tokens (the tokens to predict).

    Attributes:
        pad_token_id: the padding id; pad_right: True (CHGDataset rows are right-padded).
        lengths: ``(N,)`` int64, each row's length through its last target token.

    Right padding never changes the logits at real positions of a causal model, so batches
    need no attention mask. ``to_iterator`` / ``to_dataloader`` iterate a ``DataLoader`` as in
    inteprelens; :meth:`training_batches` gives fastgim's seeded, shuffled training batches.
    """

    _lengths: Tensor | None = None
    pad_right: bool = True

    def __init__(self, input_ids: Tensor, loss_masks: Tensor, pad_token_id: int, lengths: Tensor | None = None):
        input_ids, loss_masks = _checked_rows(input_ids, loss_masks)
        super().__init__(input_ids=input_ids, loss_masks=loss_masks)
        self.pad_token_id = int(pad_token_id)
        self._lengths = None if lengths is None else lengths.long().to(input_ids.device)

    @classmethod
    def _build(cls, input_ids: Tensor, loss_masks: Tensor, pad_token_id: int, lengths: Tensor | None = None
               ) -> CHGDataset:
        """The factories' result: a :class:`MaskedSequenceDataset` (a CHGDataset), as inteprelens' return."""
        if cls is CHGDataset:
            return MaskedSequenceDataset._build(input_ids, loss_masks, pad_token_id, lengths)
        return cls(input_ids, loss_masks, pad_token_id, lengths)

    # ------------------------------------------------------------------ factories

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        targets: Sequence[str],
        tokenizer: Any,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        tokenization: Literal["fastgim", "inteprelens"] = "fastgim",
    ) -> CHGDataset:
        """Tokenise ``prompt.rstrip()`` (with the tokenizer's special tokens) then ``" " + target``.

        The target gets a leading space unless it starts with whitespace (as inteprelens does).
        ``max_length`` truncates from the left of the prompt so the target is always kept.
        The tokenizer is not modified (no marker token is added).

        ``tokenization="inteprelens"`` tokenises as inteprelens does instead: prompt and target in one
        string joined by a separator special token that is then removed, no BOS, one extra pad
        column, and ``max_length`` cuts from the right (:func:`fastgim.chg_compat.inteprelens_tokenize`;
        the caller's tokenizer is still not modified). Token positions then differ from the default's.
        """
        _check_pairs(texts, targets)
        if tokenization == "inteprelens":
            from fastgim.chg_compat import inteprelens_tokenize

            input_ids, loss_masks = inteprelens_tokenize(texts, targets, tokenizer, _pad_token_id(tokenizer))
            if max_length is not None:
                input_ids, loss_masks = input_ids[:, :max_length], loss_masks[:, :max_length]
            return cls._build(input_ids.to(device), loss_masks.to(device), _pad_token_id(tokenizer))
        if tokenization != "fastgim":
            raise ValueError(f"tokenization must be 'fastgim' or 'inteprelens', got {tokenization!r}")
        sequences, masks = [], []
        for i, (text, target) in enumerate(zip(texts, targets)):
            prompt_ids = _encode(tokenizer, text.rstrip(), special=True)
            target_text = target if target[:1].isspace() else " " + target
            target_ids = _encode(tokenizer, target_text, special=False) if target.strip() else []
            if not target_ids:
                raise ValueError(f"target {i} ({target!r}) tokenizes to nothing; give a non-empty target string")
            if not prompt_ids:
                raise ValueError(
                    f"text {i} ({text!r}) tokenizes to nothing and the tokenizer adds no BOS token, so the first "
                    "target token has no context; give a non-empty prompt"
                )
            ids = prompt_ids + target_ids
            mask = [False] * len(prompt_ids) + [True] * len(target_ids)
            if max_length is not None:
                if max_length <= len(target_ids):
                    raise ValueError(f"max_length={max_length} leaves no prompt for target {i} "
                                     f"({len(target_ids)} tokens); raise max_length")
                ids, mask = ids[-max_length:], mask[-max_length:]
            sequences.append(ids)
            masks.append(mask)
        input_ids, loss_masks = _right_padded(sequences, masks, _pad_token_id(tokenizer))
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        return cls._build(input_ids.to(device), loss_masks.to(device), _pad_token_id(tokenizer), lengths.to(device))

    @classmethod
    def from_tokens(cls, input_ids: Tensor, loss_masks: Tensor, pad_token_id: int) -> CHGDataset:
        """Dataset from pre-tokenised ``(N, L)`` ids and boolean loss masks (True = predict this token)."""
        return cls._build(input_ids, loss_masks, pad_token_id)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: Any, max_length: int | None = None) -> CHGDataset:
        """Read one JSON object per line with a prompt (``"text"`` or ``"prompt"``) and a ``"target"``."""
        texts, targets = [], []
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            prompt = record.get("text", record.get("prompt"))
            if prompt is None or "target" not in record:
                raise ValueError(f"{path}:{number}: each line needs a 'text' (or 'prompt') and a 'target' field")
            texts.append(prompt)
            targets.append(record["target"])
        return cls.from_texts(texts, targets, tokenizer, max_length=max_length)

    @classmethod
    def from_tsv(
        cls,
        tsv_path: str,
        tokenizer: Any,
        prompt_column: str = "prompt",
        target_column: str = "target",
        max_samples: int | None = None,
        device: str = "cpu",
        last_token_only: bool = False,
        tokenization: Literal["fastgim", "inteprelens"] = "fastgim",
    ) -> CHGDataset:
        """Prompts and targets from two columns of a tab-separated file with a header row (inteprelens' API).

        Cells are read as text (``"4"`` stays ``"4"``, an empty cell is ``""``); ``max_samples`` keeps
        the first rows. ``last_token_only=True`` gives the original ABA/ABB notebooks' data:
        ``prompt + target`` concatenated as is and only the last token supervised
        (:meth:`from_concatenated_texts`). Otherwise the pairs go to :meth:`from_texts`, where
        ``tokenization`` applies: fastgim's default (BOS, no separator token) or ``"inteprelens"``
        (inteprelens' separator-token tokenisation, what inteprelens' ``from_tsv`` does).
        """
        import pandas as pd

        table = pd.read_csv(tsv_path, sep="\t", dtype=str, keep_default_na=False)
        for column in (prompt_column, target_column):
            if column not in table.columns:
                raise ValueError(f"{tsv_path} has no column {column!r}; its header has {list(table.columns)} "
                                 "(set prompt_column / target_column)")
        if max_samples is not None:
            if max_samples < 1:
                raise ValueError(f"max_samples must be >= 1 (or None for every row), got {max_samples}")
            table = table.head(max_samples)
        if table.empty:
            raise ValueError(f"{tsv_path} has no data rows")
        prompts, targets = table[prompt_column].tolist(), table[target_column].tolist()
        if last_token_only:
            return cls.from_concatenated_texts([p + t for p, t in zip(prompts, targets)], tokenizer, device=device)
        return cls.from_texts(prompts, targets, tokenizer, device=device, tokenization=tokenization)

    @classmethod
    def from_concatenated_texts(cls, texts: list[str], tokenizer: Any, device: str = "cpu") -> CHGDataset:
        """Whole texts (prompt and target already joined), supervised on their last token only.

        Each text is tokenised as ``tokenizer(text)`` (with the tokenizer's special tokens, as
        inteprelens and the original ABA/ABB notebooks). Texts of different token counts are
        right-padded and each row's own last token is the target (inteprelens needs equal counts).
        """
        _check_texts(texts)
        rows = [list(ids) for ids in tokenizer(list(texts))["input_ids"]]
        short = [i for i, ids in enumerate(rows) if len(ids) < 2]
        if short:
            raise ValueError(f"texts {short[:10]} tokenize to fewer than 2 tokens, so their last token has no "
                             "context to predict it from; give longer texts")
        masks = [[False] * (len(ids) - 1) + [True] for ids in rows]
        input_ids, loss_masks = _right_padded(rows, masks, _pad_token_id(tokenizer))
        return cls._build(input_ids.to(device), loss_masks.to(device), _pad_token_id(tokenizer))

    @classmethod
    def from_pattern_task(
        cls,
        pattern: str,
        tokenizer: Any,
        num_samples: int = 10000,
        num_lines: int = 5,
        use_vocab_tokens: bool = True,
        vocab_size: int = 26,
        seed: int | None = None,
        device: str | torch.device = "cpu",
    ) -> CHGDataset:
        """inteprelens' synthetic ``"aba"`` (induction) / ``"abb"`` (repetition) completion task.

        See :func:`fastgim.chg_compat.pattern_task_pairs` for the prompts; tokenised by :meth:`from_texts`.
        """
        from fastgim.chg_compat import pattern_task_pairs

        texts, targets = pattern_task_pairs(pattern, tokenizer, num_samples, num_lines, use_vocab_tokens,
                                            vocab_size, seed)
        return cls.from_texts(texts, targets, tokenizer, device=device)

    @classmethod
    def from_huggingface(
        cls,
        dataset_name: str,
        tokenizer: Any,
        input_column: str,
        target_column: str,
        split: str = "train",
        max_samples: int | None = None,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
    ) -> CHGDataset:
        """Prompts / targets from columns of a ``datasets`` dataset (needs ``pip install datasets``)."""
        try:
            from datasets import load_dataset
        except ImportError as error:
            raise ImportError("CHGDataset.from_huggingface needs the 'datasets' package: pip install datasets") \
                from error
        data = load_dataset(dataset_name, split=split)
        if max_samples is not None:
            data = data.select(range(min(max_samples, len(data))))
        for column in (input_column, target_column):
            if column not in data.column_names:
                raise ValueError(f"{dataset_name} has no column {column!r}; columns: {data.column_names}")
        return cls.from_texts(list(data[input_column]), list(data[target_column]), tokenizer,
                              max_length=max_length, device=device)

    # ------------------------------------------------------------------ TensorDict / inteprelens API

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str) and index not in self._dict:
            raise KeyError(f"{index!r}: this dataset holds the fields {list(self._dict)}")
        return super().__getitem__(index)

    def map(self, f: Any) -> CHGDataset:
        """A new dataset with ``f`` applied to every field (ids stay int64 and loss masks bool)."""
        fields = self._mapped(f)
        out = CHGDataset(fields.pop("input_ids"), fields.pop("loss_masks"), self.pad_token_id)
        out.update(fields)
        return out

    def collate_fn(self, batch: list[TensorDict]) -> TensorDict:
        """Stack samples, then drop the all-padding columns (inteprelens' ``MaskedSequenceDataset.collate_fn``).

        With ``pad_right`` the columns from the first all-padding column on are dropped from every
        ``(batch, L)`` field; otherwise the all-padding columns before the first column that is not.
        """
        stacked = TensorDict.stack(batch)
        tokens = stacked["input_ids"]
        all_padding = (tokens == self.pad_token_id).all(0)
        if not all_padding.any():
            return stacked
        if self.pad_right:
            columns = slice(None, int(all_padding.int().argmax()))
        else:
            columns = slice(int(all_padding.int().argmin()), None)
        for key, value in stacked.items():
            if isinstance(value, Tensor) and value.dim() == 2 and value.shape[1] == tokens.shape[1]:
                stacked._dict[key] = value[:, columns]
        return stacked

    # ------------------------------------------------------------------ CHG batches

    @property
    def lengths(self) -> Tensor:
        """``(N,)`` int64: each row's length through its last target token (after moving left padding)."""
        if self._lengths is not None:
            return self._lengths
        return _target_lengths(self._training_rows()[1])

    def _training_rows(self, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(input_ids, loss_masks)`` of ``rows`` (all when None), checked for CHG and right-padded."""
        if "loss_masks" not in self._dict:
            raise ValueError(f"{type(self).__name__} has no 'loss_masks' field: CHG training needs loss_masks "
                             "(N, L) bool, True at the target tokens; add it with dataset['loss_masks'] = ...")
        input_ids, loss_masks = self._dict["input_ids"], self._dict["loss_masks"]
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or not isinstance(loss_masks, Tensor) \
                or loss_masks.shape != input_ids.shape:
            raise ValueError(f"input_ids and loss_masks must both be (num_samples, seq_len) tensors, got "
                             f"{getattr(input_ids, 'shape', input_ids)} and {getattr(loss_masks, 'shape', loss_masks)}")
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError("a CHG dataset needs at least one sample")
        picked = slice(None) if rows is None else rows
        input_ids, loss_masks = input_ids[picked].long(), loss_masks[picked].to(torch.bool)
        if not self.pad_right:
            attention = self._dict.get("attention_mask")
            real = input_ids != self.pad_token_id if attention is None else attention[picked].to(torch.bool)
            input_ids, loss_masks = _moved_left(input_ids, loss_masks, real, self.pad_token_id)
        _check_targets(loss_masks, rows)
        return input_ids, loss_masks

    def batch(self, indices: Tensor) -> dict[str, Tensor]:
        """Rows ``indices`` (right-padded), without the columns after the last target token of any of them."""
        input_ids, loss_masks = self._training_rows(indices)
        lengths = _target_lengths(loss_masks) if self._lengths is None else self._lengths[indices]
        return _trimmed_batch(input_ids, loss_masks, lengths, torch.arange(len(indices), device=input_ids.device))

    def training_batches(self, batch_size: int, shuffle: bool = True, seed: int | None = None,
                         order: Literal["fastgim", "inteprelens"] = "fastgim") -> Iterator[dict[str, Tensor]]:
        """Endless ``{"input_ids", "loss_masks"}`` batches for CHG training (what ``CHGTrainer`` reads).

        Rows are right-padded (left padding moved, see the module docstring) and trimmed after the
        last target token of the batch. Each epoch is a fresh permutation when ``shuffle`` (batches
        never span epochs), seeded by ``seed``. ``order="inteprelens"`` draws the permutations as
        inteprelens does (a shuffled ``torch.utils.data.DataLoader`` per epoch, seeded from the global
        RNG; ``seed`` must be None). The dataset is checked (and copied when left-padded) on this call.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if order not in ("fastgim", "inteprelens"):
            raise ValueError(f"order must be 'fastgim' or 'inteprelens', got {order!r}")
        if order == "inteprelens" and seed is not None:
            raise ValueError("order='inteprelens' draws from the global RNG; call torch.manual_seed instead of seed=")
        input_ids, loss_masks = self._training_rows()
        lengths = _target_lengths(loss_masks) if self._lengths is None else self._lengths
        if order == "fastgim":
            return _endless_batches(input_ids, loss_masks, lengths, batch_size, shuffle, seed)
        from fastgim.chg_compat import dataloader_batches

        return (_trimmed_batch(input_ids, loss_masks, lengths, i.to(input_ids.device))
                for i in dataloader_batches(len(input_ids), batch_size, shuffle))

    def to_iterator(self, batch_size: int | None = None, **kwargs: Any) -> Iterator[TensorDict]:
        """inteprelens' endless batches: ``iter(self.to_dataloader(infinite=True, **kwargs))``.

        ``kwargs`` go to ``torch.utils.data.DataLoader`` (``shuffle=False`` unless given, as there);
        ``batch_size`` may also be given positionally. fastgim's seeded, shuffled training batches
        (what :class:`CHGTrainer` reads) are :meth:`training_batches`.
        """
        if batch_size is not None:
            kwargs["batch_size"] = batch_size
        return TensorDictDataset.to_iterator(self, **kwargs)


def _right_padded(rows: list[list[int]], masks: list[list[bool]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    loss_masks = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        loss_masks[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return input_ids, loss_masks


class MaskedSequenceDataset(CHGDataset):
    """inteprelens' dataset of token rows: ``MaskedSequenceDataset(pad_token_id, pad_right=True, **tensors)``.

    Any fields are accepted; ``input_ids`` ``(N, L)`` is required, and CHG training also needs
    ``loss_masks`` ``(N, L)`` bool (checked when a trainer starts). Every method behaves as inteprelens
    0.2.1's: ``collate_fn`` drops the all-padding columns of a batch (on the right with
    ``pad_right=True``, on the left otherwise), ``map`` returns a MaskedSequenceDataset, and
    ``to_iterator(**kwargs)`` / ``to_dataloader(**kwargs)`` iterate a ``torch.utils.data.DataLoader``.

    ``pad_right=False`` (left-padded rows) trains with the loss of the same rows right-padded, not
    inteprelens' (see the module docstring).
    """

    def __init__(self, pad_token_id: int, pad_right: bool = True, **kwargs: Tensor):
        if "input_ids" not in kwargs:
            raise ValueError("MaskedSequenceDataset requires 'input_ids' field (N, L) token ids; pass input_ids=...")
        TensorDictDataset.__init__(self, **kwargs)
        self.pad_token_id = pad_token_id
        self.pad_right = pad_right

    @classmethod
    def _build(cls, input_ids: Tensor, loss_masks: Tensor, pad_token_id: int, lengths: Tensor | None = None
               ) -> MaskedSequenceDataset:
        input_ids, loss_masks = _checked_rows(input_ids, loss_masks)
        data = cls(int(pad_token_id), input_ids=input_ids, loss_masks=loss_masks)
        data._lengths = None if lengths is None else lengths.long().to(input_ids.device)
        return data

    def map(self, f: Any) -> MaskedSequenceDataset:
        """A new MaskedSequenceDataset (same ``pad_token_id`` / ``pad_right``) with ``f`` applied to every field."""
        return MaskedSequenceDataset(self.pad_token_id, self.pad_right, **self._mapped(f))

