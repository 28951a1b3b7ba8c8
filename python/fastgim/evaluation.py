"""``fastgim.evaluate``: faithfulness of attribution methods (the GIM paper's protocol).

For every example and method the attribution ranks the *eligible* prompt tokens (all but the
first and the last, as in the paper: the first is BOS / an attention sink, the last is where the
prediction is read) by signed score, most positive first. Then, with ``f`` the target value on the
full input (the target logit for language models) and ``f(x')`` on a perturbed input where tokens
are replaced by the baseline token:

* comprehensiveness = mean over k = 1..K of ``(f - f(x without its top-k tokens)) / |f|``
  (the area over the perturbation curve, normalised by the full value; higher = more faithful);
* sufficiency = mean over q in (50, 80, 90, 95, 99 %) of ``(f - f(x keeping only its top
  floor(q * n) eligible tokens)) / |f|`` (lower = more faithful).

All perturbed inputs of one example run through the model as one batch (chunks of ``batch_size``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fastgim import validation
from fastgim.attribution import (
    METHODS,
    attribute,
    batched_target_values,
    build_target,
    prepare_inputs,
    resolve_baseline,
    target_values,
)
from fastgim.params import eval_mode

__all__ = ["evaluate", "EvaluationResult", "SUFFICIENCY_FRACTIONS"]

SUFFICIENCY_FRACTIONS = (0.5, 0.8, 0.9, 0.95, 0.99)


@dataclasses.dataclass
class EvaluationResult:
    """Per-example rows (method, example, comprehensiveness, sufficiency, full_value, n_eligible)."""

    rows: list[dict[str, Any]]
    methods: list[str]
    skipped: int = 0

    def frame(self) -> Any:
        """The per-example rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["method", "example", "comprehensiveness", "sufficiency",
                                                "full_value", "n_eligible"])

    def table(self) -> Any:
        """Mean and standard error per method (DataFrame indexed by method, in the requested order)."""
        frame = self.frame()
        grouped = frame.groupby("method")[["comprehensiveness", "sufficiency"]]
        table = grouped.mean().add_suffix("_mean").join(grouped.sem(ddof=1).add_suffix("_sem"))
        table["n"] = grouped.size()
        return table.reindex([m for m in self.methods if m in table.index])

    def summary(self) -> dict[str, dict[str, float]]:
        """``{method: {"comprehensiveness": mean, "sufficiency": mean, "n": count}}``."""
        table = self.table()
        return {
            method: {
                "comprehensiveness": float(row["comprehensiveness_mean"]),
                "comprehensiveness_sem": _float(row["comprehensiveness_sem"]),
                "sufficiency": float(row["sufficiency_mean"]),
                "sufficiency_sem": _float(row["sufficiency_sem"]),
                "n": int(row["n"]),
            }
            for method, row in table.iterrows()
        }

    def to_markdown(self) -> str:
        """A markdown table: method | comprehensiveness (higher better) | sufficiency (lower better) | n."""
        lines = [
            "| method | comprehensiveness (higher is better) | sufficiency (lower is better) | n |",
            "|---|---:|---:|---:|",
        ]
        for method, row in self.summary().items():
            lines.append(
                f"| {method} | {row['comprehensiveness']:.4f} ± {row['comprehensiveness_sem']:.4f} "
                f"| {row['sufficiency']:.4f} ± {row['sufficiency_sem']:.4f} | {row['n']} |"
            )
        return "\n".join(lines)


def _float(value: Any) -> float:
    value = float(value)
    return 0.0 if math.isnan(value) else value


def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    methods: Sequence[str] = ("gim", "gradient_x_input", "integrated_gradients"),
    tokenizer: Any = None,
    max_k: int = 10,
    sufficiency_fractions: Sequence[float] = SUFFICIENCY_FRACTIONS,
    baseline_token_id: int | None = None,
    batch_size: int = 16,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Comprehensiveness and sufficiency of each method over ``data``.

    Args:
        model: causal LM (or any model when the examples carry callable targets).
        data: examples: text, token ids, or dicts with ``"text"`` / ``"input_ids"`` / ``"messages"``
            and optional ``"target"`` (anything :func:`fastgim.attribute` accepts; default: the
            model's top next-token prediction) and ``"contrast"``.
        methods: names from :data:`fastgim.attribution.METHODS`.
        max_k: K, the largest number of top tokens removed for comprehensiveness.
        sufficiency_fractions: fractions of the eligible tokens kept for sufficiency, each in (0, 1].
        baseline_token_id: the replacement token (default as in :func:`fastgim.attribute`).
        batch_size: rows per forward pass for the perturbed inputs (and IG / occlusion chunks).
        method_kwargs: extra keyword arguments per method, e.g. ``{"integrated_gradients": {"n_steps": 16}}``.
        progress: show a tqdm progress bar.

    Returns:
        :class:`EvaluationResult`; ``.table()`` / ``.to_markdown()`` compare the methods.
    """
    from tqdm.auto import tqdm

    methods = _check_methods(methods)
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    if not sufficiency_fractions or not all(0 < q <= 1 for q in sufficiency_fractions):
        raise ValueError(f"sufficiency_fractions must be non-empty, each in (0, 1], got {sufficiency_fractions}")
    examples = [_example(item) for item in data]
    if not examples:
        raise ValueError("evaluate got no examples")
    vocab = validation.vocabulary_size(model)
    for example in examples:  # every input checked before any compute
        prepare_inputs(example["inputs"], tokenizer, vocab=vocab)
    baseline = resolve_baseline(baseline_token_id, tokenizer, model)
    if baseline is None:
        raise ValueError("evaluation replaces tokens by a baseline token: pass baseline_token_id= or a tokenizer")
    rows: list[dict[str, Any]] = []
    skipped = 0
    with tqdm(total=len(examples) * len(methods), desc="evaluate", disable=not progress) as bar:
        for index, example in enumerate(examples):
            result = _evaluate_example(
                model, example, index, methods, tokenizer, baseline, max_k, sufficiency_fractions,
                batch_size, method_kwargs or {}, bar,
            )
            if result is None:
                skipped += 1
                bar.update(len(methods))
            else:
                rows.extend(result)
    if not rows:
        raise ValueError("no example had an eligible token (inputs need at least 3 prompt tokens)")
    return EvaluationResult(rows, list(methods), skipped)


def _check_methods(methods: Sequence[str] | str) -> list[str]:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown or no methods {unknown or methods}; choose from {', '.join(METHODS)}")
    return list(methods)


def _example(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        keys = [k for k in ("text", "input_ids", "messages") if k in item]
        if len(keys) != 1:
            raise ValueError(f"each example needs exactly one of 'text', 'input_ids', 'messages'; got keys {sorted(item)}")
        return {"inputs": item[keys[0]], "target": item.get("target"), "contrast": item.get("contrast")}
    return {"inputs": item, "target": None, "contrast": None}


def _evaluate_example(
    model: nn.Module, example: dict[str, Any], index: int, methods: list[str], tokenizer: Any, baseline: int,
    max_k: int, fractions: Sequence[float], batch_size: int, method_kwargs: dict[str, dict[str, Any]], bar: Any,
) -> list[dict[str, Any]] | None:
    device = next(model.parameters()).device
    mode = contextlib.ExitStack()
    mode.enter_context(eval_mode(model))  # restored by the last concurrent user
    try:
        prepared = prepare_inputs(example["inputs"], tokenizer, device=device,
                                  vocab=validation.vocabulary_size(model))
        prepared, spec = build_target(model, prepared, example["target"], tokenizer=tokenizer,
                                      contrast=example["contrast"])
        eligible = torch.arange(1, prepared.prompt_length - 1)
        if eligible.numel() == 0:
            return None
        full = float(target_values(model, prepared.input_ids, prepared, spec).sum())
        target = spec.fn if spec.fn is not None else (example["target"] if isinstance(example["target"], str)
                                                      else spec.token_ids[0])
        rows = []
        for method in methods:
            kwargs = {"internal_batch_size": batch_size, "seed": index, **method_kwargs.get(method, {})}
            scores = attribute(model, example["inputs"], method=method, target=target, tokenizer=tokenizer,
                               contrast=example["contrast"], baseline_token_id=baseline, **kwargs).scores
            comp, suff = _curves(model, prepared, spec, scores, eligible, baseline, max_k, fractions, batch_size)
            scale = max(abs(full), 1e-6)
            rows.append({
                "method": method, "example": index, "comprehensiveness": float((full - comp).mean() / scale),
                "sufficiency": float((full - suff).mean() / scale), "full_value": full,
                "n_eligible": int(eligible.numel()),
            })
            bar.update(1)
        return rows
    finally:
        mode.close()


def _curves(
    model: nn.Module, prepared: Any, spec: Any, scores: torch.Tensor, eligible: torch.Tensor, baseline: int,
    max_k: int, fractions: Sequence[float], batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target values with the top-k removed (k = 1..K) and with only the top q kept, as float tensors."""
    order = eligible[torch.argsort(scores[eligible], descending=True, stable=True)].to(prepared.input_ids.device)
    n = order.numel()
    ids = prepared.input_ids[0]
    variants = []
    for k in range(1, min(max_k, n) + 1):
        variant = ids.clone()
        variant[order[:k]] = baseline
        variants.append(variant)
    for q in fractions:
        variant = ids.clone()
        variant[order[int(math.floor(q * n + 1e-9)) :]] = baseline
        variants.append(variant)
    values = batched_target_values(model, torch.stack(variants), prepared, spec, batch_size).sum(-1).cpu()
    n_comp = min(max_k, n)
    return values[:n_comp], values[n_comp:]
