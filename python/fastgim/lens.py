"""``LensAPI``: inteprelens' high-level interface (CHG fitting, scoring, tracing) on fastgim.

CHG runs on the fused attention gate (:mod:`fastgim.chg`); ``trace`` and ``score`` delegate to
:class:`fastgim.tracing.TransformerTracer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastgim.chg import CHGDataset, CHGResults, CHGTrainer, _head_counts
from fastgim.params import eval_mode
from fastgim.tracing import TokenScores, TraceResult, TransformerTracer


class LensAPI:
    """CHG analysis, token scoring and named-site tracing for a Hugging Face causal LM.

    Example::

        lens = LensAPI.from_pretrained("path/to/model")       # or LensAPI.from_pretrained() for the default
        results = lens.fit(texts=["The capital of France is"], targets=[" Paris"], num_masks=4)
        print(results.summary())
    """

    def __init__(self, model: nn.Module, tokenizer: Any, adapter: Any = None, device: str | None = None):
        """Wrap ``model`` (parameters frozen with ``requires_grad=False``, as inteprelens).

        The model's training flag is kept: each call runs in eval mode and restores it.
        ``adapter`` defaults to :func:`fastgim.adapters.get_adapter`; a custom one (an inteprelens-style
        :class:`fastgim.adapters.ModelAdapter` subclass) also serves CHG fits, which gate heads through it
        when the model's attention cannot take fastgim's fused gate. ``device`` moves the model.
        """
        from fastgim.adapters import get_adapter

        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter if adapter is not None else get_adapter(model)
        self.num_layers, self.num_heads = (int(self.adapter.num_layers), int(self.adapter.num_heads)) \
            if adapter is not None else _head_counts(model)
        for param in self.model.parameters():  # inteprelens freezes the analysed model
            param.requires_grad_(False)
        if device is not None:
            self.model.to(device)

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | Path | None = None,
        device: str | None = None,
        torch_dtype: Any = None,
        trust_remote_code: bool = False,
        **model_kwargs: Any,
    ) -> LensAPI:
        """Load a local model directory (or hub id if cached) with ``attn_implementation="gim_fused"``.

        ``None`` loads the default model shipped with fastgim (:func:`fastgim.load_default_model`).
        Loading goes through :func:`fastgim.loading.load_model`: a missing folder, a folder that is not a
        model, or a checkpoint without a trained LM head is a :class:`fastgim.loading.ModelLoadError`.
        ``device`` defaults to CUDA when available; ``torch_dtype`` to the checkpoint's.
        """
        from fastgim.loading import load_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model(model_name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                      **model_kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, device=None if "device_map" in model_kwargs else device)

    def fit(
        self,
        texts: Sequence[str],
        targets: Sequence[str],
        max_length: int | None = None,
        num_masks: int | None = 10,
        num_updates: int = 500,
        num_reg_updates: int = 500,
        batch_size: int = 32,
        l1_weight: float = 0.1,
        lr: float = 1.0,
        gradient_accum_steps: int = 1,
        save_path: str | Path | None = None,
        verbose: bool = True,
        callback: Callable[[Tensor, dict[str, Any]], None] | None = None,
        threshold: float = 0.5,
        seed: int | None = None,
        convention: Literal["paper", "inteprelens"] = "paper",
    ) -> CHGResults:
        """Fit CHG masks so the model predicts ``targets`` after ``texts``; returns :class:`CHGResults`.

        Args:
            texts, targets: prompt / answer strings, one target per prompt (the loss covers the target
                tokens only).
            num_masks: independent masks learned in one pass (>= 1); the taxonomy reports their mean and
                agreement.
            num_updates: updates of the unregularised stage; num_reg_updates: of each regularised stage.
            batch_size, l1_weight, lr, gradient_accum_steps: see :class:`CHGTrainer`.
            save_path: directory receiving the results after each stage.
            verbose: tqdm progress bar over updates.
            threshold: default "on" threshold of the returned results; seed: makes the fit repeatable.
            convention: ``"paper"`` (default) or ``"inteprelens"``: inteprelens' tokenisation (target
                separator token, no BOS), training numerics (bf16 autocast, mean over masks, joint
                gradient clipping, DataLoader batch order) and head labels (see :class:`CHGResults`).
        """
        _check_num_masks(num_masks)
        _check_convention(convention)
        dataset = CHGDataset.from_texts(texts, targets, self.tokenizer, max_length=max_length, device=self.device,
                                        tokenization="inteprelens" if convention == "inteprelens" else "fastgim")
        return self.fit_dataset(dataset, num_masks=num_masks, num_updates=num_updates,
                                num_reg_updates=num_reg_updates, batch_size=batch_size, l1_weight=l1_weight, lr=lr,
                                gradient_accum_steps=gradient_accum_steps, save_path=save_path, verbose=verbose,
                                callback=callback, threshold=threshold, seed=seed, convention=convention)

    def fit_dataset(
        self,
        dataset: CHGDataset,
        num_masks: int | None = 10,
        num_updates: int = 500,
        num_reg_updates: int = 500,
        batch_size: int = 32,
        l1_weight: float = 0.1,
        lr: float = 1.0,
        gradient_accum_steps: int = 1,
        save_path: str | Path | None = None,
        verbose: bool = True,
        callback: Callable[[Tensor, dict[str, Any]], None] | None = None,
        threshold: float = 0.5,
        seed: int | None = None,
        convention: Literal["paper", "inteprelens"] = "paper",
    ) -> CHGResults:
        """:meth:`fit` on a prepared :class:`CHGDataset` (or inteprelens' ``MaskedSequenceDataset``).

        ``convention="inteprelens"`` trains with inteprelens' numerics and labels the heads its way
        (the dataset's tokenisation is the dataset's own).
        """
        _check_num_masks(num_masks)
        _check_convention(convention)
        trainer = CHGTrainer(self.model, dataset, num_masks=num_masks, batch_size=batch_size, l1_weight=l1_weight,
                             lr=lr, lr_reg=lr, gradient_accum_steps=gradient_accum_steps, seed=seed,
                             numerics="inteprelens" if convention == "inteprelens" else "fastgim",
                             adapter=self.adapter)
        history: dict[str, list[Tensor]] = {}
        metrics: list[dict[str, Any]] = []
        with eval_mode(self.model):  # no dropout while fitting; the caller's training flag comes back
            for mask, record in trainer.fit(num_updates, num_reg_updates, save_path=save_path, verbose=verbose,
                                            callback=callback):
                history.setdefault(record["regularization"], []).append(mask)
                metrics.append(record)
        results = trainer.results(history, metrics)
        results.threshold = threshold
        results.convention = convention
        if save_path is not None:
            results.save(save_path)
        return results

    def trace(
        self,
        *,
        texts: str | list[str] | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        layers: Iterable[int] | None = None,
        sites: Iterable[str] | None = None,
        detach: bool = True,
        clone: bool = True,
        **model_kwargs: Any,
    ) -> TraceResult:
        """Named-site activations for ``texts`` (or ``input_ids``): :meth:`fastgim.tracing.TransformerTracer.trace`."""
        tracer = TransformerTracer(self.model, self.tokenizer, adapter=self.adapter)
        with eval_mode(self.model):
            return tracer.trace(texts, layers=layers, sites=sites, input_ids=input_ids, attention_mask=attention_mask,
                                detach=detach, clone=clone, **model_kwargs)

    def score(
        self,
        *,
        texts: str | list[str] | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temperature: float | None = None,
        **model_kwargs: Any,
    ) -> TokenScores:
        """Logits / temperature, log-probs and probs for ``texts``: :meth:`fastgim.tracing.TransformerTracer.score`."""
        tracer = TransformerTracer(self.model, self.tokenizer, adapter=self.adapter)
        with eval_mode(self.model):
            return tracer.score(texts, temperature=temperature, input_ids=input_ids, attention_mask=attention_mask,
                                **model_kwargs)

    def fit_pattern_task(
        self,
        pattern: str = "aba",
        num_samples: int = 10000,
        num_masks: int | None = 10,
        num_updates: int = 500,
        num_reg_updates: int = 500,
        batch_size: int = 32,
        l1_weight: float = 0.1,
        lr: float = 1.0,
        gradient_accum_steps: int = 1,
        save_path: str | Path | None = None,
        verbose: bool = True,
    ) -> CHGResults:
        """:meth:`fit_dataset` on :meth:`CHGDataset.from_pattern_task` (``"aba"`` induction or ``"abb"``)."""
        dataset = CHGDataset.from_pattern_task(pattern, self.tokenizer, num_samples=num_samples, device=self.device)
        return self.fit_dataset(dataset, num_masks=num_masks, num_updates=num_updates,
                                num_reg_updates=num_reg_updates, batch_size=batch_size, l1_weight=l1_weight, lr=lr,
                                gradient_accum_steps=gradient_accum_steps, save_path=save_path, verbose=verbose)

    def fit_huggingface(
        self,
        dataset_name: str,
        input_column: str,
        target_column: str,
        split: str = "train",
        max_samples: int | None = None,
        max_length: int | None = None,
        num_masks: int | None = 10,
        num_updates: int = 500,
        num_reg_updates: int = 500,
        batch_size: int = 32,
        l1_weight: float = 0.1,
        lr: float = 1.0,
        gradient_accum_steps: int = 1,
        save_path: str | Path | None = None,
        verbose: bool = True,
    ) -> CHGResults:
        """:meth:`fit_dataset` on a ``datasets`` dataset (:meth:`CHGDataset.from_huggingface`)."""
        dataset = CHGDataset.from_huggingface(dataset_name, self.tokenizer, input_column, target_column, split=split,
                                              max_samples=max_samples, max_length=max_length, device=self.device)
        return self.fit_dataset(dataset, num_masks=num_masks, num_updates=num_updates,
                                num_reg_updates=num_reg_updates, batch_size=batch_size, l1_weight=l1_weight, lr=lr,
                                gradient_accum_steps=gradient_accum_steps, save_path=save_path, verbose=verbose)


def _check_num_masks(num_masks: int | None) -> None:
    if num_masks is not None and (isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1):
        raise ValueError(f"num_masks must be >= 1 (or None for a single (layers, heads) mask), got {num_masks!r}")


def _check_convention(convention: str) -> None:
    if convention not in ("paper", "inteprelens"):
        raise ValueError(f"convention must be 'paper' (the CHG paper's labels, fastgim's default) or 'inteprelens', "
                         f"got {convention!r}")
