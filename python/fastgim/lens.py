"""``LensAPI``: inteprelens' high-level interface (CHG fitting, scoring, tracing) on fastgim.

CHG runs on the fused attention gate (:mod:`fastgim.chg`); ``trace`` and ``score`` delegate to
:class:`fastgim.tracing.TransformerTracer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastgim.chg import CHGDataset, CHGResults, CHGTrainer, _head_counts
from fastgim.params import eval_mode


class LensAPI:
    """CHG analysis, token scoring and named-site tracing for a Hugging Face causal LM.

    Example::

        lens = LensAPI.from_pretrained("path/to/model")       # or LensAPI.from_pretrained() for the default
        results = lens.fit(texts=["The capital of France is"], targets=[" Paris"], num_masks=4)
        print(results.summary())
    """

    def __init__(self, model: nn.Module, tokenizer: Any, adapter: Any = None, device: str | None = None):
        self.model = model  # its training flag is kept: each call runs in eval mode and restores it
        self.tokenizer = tokenizer
        self.num_layers, self.num_heads = _head_counts(model)
        if device is not None:
            self.model.to(device)
        del adapter  # accepted for inteprelens compatibility

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
        ``device`` defaults to CUDA when available; ``torch_dtype`` to the checkpoint's.
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model_name_or_path is None:
            from fastgim.default_model import load_default_model

            model, tokenizer = load_default_model()
            return cls(model, tokenizer, device=device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model_kwargs.setdefault("attn_implementation", "gim_fused")
        if torch_dtype is not None:
            model_kwargs["dtype"] = torch_dtype
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code,
                                                     **model_kwargs)
        return cls(model, tokenizer, device=None if "device_map" in model_kwargs else device)

    def fit(
        self,
        texts: Sequence[str],
        targets: Sequence[str],
        max_length: int | None = None,
        num_masks: int = 10,
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
        """
        if num_masks is None or num_masks < 1:
            raise ValueError(f"num_masks must be >= 1, got {num_masks}")
        dataset = CHGDataset.from_texts(texts, targets, self.tokenizer, max_length=max_length, device=self.device)
        return self.fit_dataset(dataset, num_masks=num_masks, num_updates=num_updates,
                                num_reg_updates=num_reg_updates, batch_size=batch_size, l1_weight=l1_weight, lr=lr,
                                gradient_accum_steps=gradient_accum_steps, save_path=save_path, verbose=verbose,
                                callback=callback, threshold=threshold, seed=seed)

    def fit_dataset(
        self,
        dataset: CHGDataset,
        num_masks: int = 10,
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
    ) -> CHGResults:
        """:meth:`fit` on a prepared :class:`CHGDataset`."""
        if num_masks is None or num_masks < 1:
            raise ValueError(f"num_masks must be >= 1, got {num_masks}")
        trainer = CHGTrainer(self.model, dataset, num_masks=num_masks, batch_size=batch_size, l1_weight=l1_weight,
                             lr=lr, lr_reg=lr, gradient_accum_steps=gradient_accum_steps, seed=seed)
        history: dict[str, list[Tensor]] = {}
        metrics: list[dict[str, Any]] = []
        with eval_mode(self.model):  # no dropout while fitting; the caller's training flag comes back
            for mask, record in trainer.fit(num_updates, num_reg_updates, save_path=save_path, verbose=verbose,
                                            callback=callback):
                history.setdefault(record["regularization"], []).append(mask)
                metrics.append(record)
        results = trainer.results(history, metrics)
        results.threshold = threshold
        if save_path is not None:
            results.save(save_path)
        return results

    def trace(self, texts: Any = None, layers: Iterable[int] | None = None, sites: Iterable[str] | None = None,
              *, input_ids: Tensor | None = None, attention_mask: Tensor | None = None) -> Any:
        """Named-site activations for ``texts`` (or ``input_ids``): :meth:`fastgim.tracing.TransformerTracer.trace`."""
        from fastgim.tracing import TransformerTracer

        source = self._source(texts, input_ids)
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        layers = None if layers is None else list(layers)
        sites = None if sites is None else list(sites)
        with eval_mode(self.model):
            return TransformerTracer(self.model, self.tokenizer).trace(source, layers=layers, sites=sites, **extra)

    def score(self, texts: Any = None, temperature: float | None = 1.0, *, input_ids: Tensor | None = None,
              attention_mask: Tensor | None = None) -> Any:
        """Logits / log-probs / probs for ``texts``: :meth:`fastgim.tracing.TransformerTracer.score`."""
        from fastgim.tracing import TransformerTracer

        source = self._source(texts, input_ids)
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        temperature = 1.0 if temperature is None else temperature
        with eval_mode(self.model):
            return TransformerTracer(self.model, self.tokenizer).score(source, temperature=temperature, **extra)

    @staticmethod
    def _source(texts: Any, input_ids: Tensor | None) -> Any:
        if (texts is None) == (input_ids is None):
            raise ValueError("give exactly one of texts= or input_ids=")
        return texts if texts is not None else input_ids
