"""``fastgim.evaluate``: faithfulness of attribution methods (the GIM paper's protocol).

For every example and method the attribution ranks the *eligible* prompt tokens (all but the
first and the last, as in the paper: the first is BOS / an attention sink, the last is where the
prediction is read) by signed score, most positive first. Then, with ``f`` the target value on the
full input and ``f(x')`` on a perturbed input where tokens are replaced by the baseline token:

* comprehensiveness = mean over k = 1..K of ``(f - f(x without its top-k tokens)) / N``: the
  top-k tokens are replaced cumulatively (the area over the perturbation curve; higher = more
  faithful). The default K is 50 (fewer when the input has fewer eligible tokens);
* sufficiency = mean over q in (50, 80, 90, 95, 99 %) of ``(f - f(x keeping only its top
  floor(q * n) eligible tokens)) / N`` (lower = more faithful).

The normaliser ``N`` depends on the kind of target (:func:`target_kind`); one evaluation holds one
kind only, because normalised scores of different kinds are not comparable:

* ``"logit"`` (the default: the model's top prediction, or a token id): ``N = |f|``, the full
  logit, exactly the paper's protocol. 1 means the perturbation brought the logit to 0.
* ``"logit difference"`` (a token target with a contrast) and ``"callable"`` (any scalar of the
  outputs): ``N = |f|`` as well.
* ``"log-prob"`` (a continuation string: ``f`` is the sum of its tokens' log-probabilities): the
  paper's ``|f|`` is meaningless here, because a confident model gives log-probs near 0 and the ratio
  explodes (thousands). Instead ``N = f - f_chance`` with ``f_chance = -m * ln(V)`` (``m``
  continuation tokens, ``V`` the vocabulary size): the log-prob a uniform prediction would give,
  so ``N`` is the evidence for the continuation above chance, in nats. 1 means the perturbation
  brought the continuation down to chance level; values above 1 mean below chance. Examples whose
  continuation is already at or below chance (``N <= 0``) have nothing to remove and are skipped
  (counted in :attr:`EvaluationResult.skipped_reasons`).

All perturbed inputs of one example run through the model as one batch (chunks of ``batch_size``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fastgim import validation
from fastgim.attribution import (
    METHODS,
    _forward,
    _logits,
    attribute,
    batched_target_values,
    build_target,
    prepare_inputs,
    resolve_baseline,
)
from fastgim.params import eval_mode
from fastgim.progress import progress_bar

__all__ = ["evaluate", "EvaluationResult", "SUFFICIENCY_FRACTIONS", "DEFAULT_MAX_K", "TARGET_KINDS", "target_kind"]

SUFFICIENCY_FRACTIONS = (0.5, 0.8, 0.9, 0.95, 0.99)
DEFAULT_MAX_K = 50  # the GIM paper's largest k
TARGET_KINDS = {
    "logit": "logit of the target token, normalised by the full logit |f| (the GIM paper's protocol)",
    "logit difference": "target logit minus contrast logit, normalised by its full value |f|",
    "log-prob": "sum of the continuation's log-probs, normalised by its drop to chance level f + m*ln(V)",
    "callable": "the callable's value, normalised by its full value |f|",
}


def target_kind(example: Any) -> str:
    """The kind of target of one example (a key of :data:`TARGET_KINDS`); fixes the normalisation."""
    target = example.get("target") if isinstance(example, dict) else None
    if callable(target):
        return "callable"
    if isinstance(target, str):
        return "log-prob"
    if isinstance(example, dict) and example.get("contrast") is not None:
        return "logit difference"
    return "logit"


@dataclasses.dataclass
class EvaluationResult:
    """Per-example rows (method, example, comprehensiveness, sufficiency, full_value, normaliser, n_eligible).

    ``target_kind`` names the one kind of target of every row (see :data:`TARGET_KINDS`);
    ``skipped`` counts the examples left out, ``skipped_reasons`` says why.
    """

    rows: list[dict[str, Any]]
    methods: list[str]
    skipped: int = 0
    target_kind: str = "logit"
    skipped_reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def frame(self) -> Any:
        """The per-example rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["method", "example", "comprehensiveness", "sufficiency",
                                                "full_value", "normaliser", "n_eligible"])

    def table(self) -> Any:
        """Mean and standard error per method (DataFrame indexed by method, in the requested order)."""
        frame = self.frame()
        grouped = frame.groupby("method")[["comprehensiveness", "sufficiency"]]
        table = grouped.mean().add_suffix("_mean").join(grouped.sem(ddof=1).add_suffix("_sem"))
        table["n"] = grouped.size()
        return table.reindex([m for m in self.methods if m in table.index])

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{method: {"comprehensiveness": mean, "sufficiency": mean, ..._sem, "n", "target_kind"}}``."""
        table = self.table()
        return {
            method: {
                "comprehensiveness": float(row["comprehensiveness_mean"]),
                "comprehensiveness_sem": _float(row["comprehensiveness_sem"]),
                "sufficiency": float(row["sufficiency_mean"]),
                "sufficiency_sem": _float(row["sufficiency_sem"]),
                "n": int(row["n"]),
                "target_kind": self.target_kind,
            }
            for method, row in table.iterrows()
        }

    def to_markdown(self) -> str:
        """A markdown table: method | comprehensiveness (higher better) | sufficiency (lower better) | n.

        The first line names the target kind and its normalisation.
        """
        lines = [
            f"target: {TARGET_KINDS[self.target_kind]}",
            "",
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
    max_k: int = DEFAULT_MAX_K,
    sufficiency_fractions: Sequence[float] = SUFFICIENCY_FRACTIONS,
    baseline_token_id: int | None = None,
    batch_size: int = 16,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    progress: bool | None = None,
) -> EvaluationResult:
    """Comprehensiveness and sufficiency of each method over ``data`` (see the module docstring).

    Args:
        model: causal LM (or any model when the examples carry callable targets).
        data: examples: text, token ids, or dicts with ``"text"`` / ``"input_ids"`` / ``"messages"``
            and optional ``"target"`` (anything :func:`fastgim.attribute` accepts; default: the
            model's top next-token prediction) and ``"contrast"``. All examples must have the same
            :func:`target_kind` (logit, logit difference, log-prob or callable): their normalised
            scores are not comparable, so mixed data is refused.
        methods: names from :data:`fastgim.attribution.METHODS`.
        max_k: K, the largest number of top tokens removed (cumulatively) for comprehensiveness;
            50 as in the GIM paper.
        sufficiency_fractions: fractions of the eligible tokens kept for sufficiency, each in (0, 1].
        baseline_token_id: the replacement token (default as in :func:`fastgim.attribute`).
        batch_size: rows per forward pass for the perturbed inputs (and IG / occlusion chunks).
        method_kwargs: extra keyword arguments per method, e.g. ``{"integrated_gradients": {"n_steps": 16}}``.
        progress: show a progress bar; ``None`` (default): only when stderr is a terminal.

    Returns:
        :class:`EvaluationResult`; ``.table()`` / ``.to_markdown()`` compare the methods.
    """
    methods = _check_methods(methods)
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    if not sufficiency_fractions or not all(0 < q <= 1 for q in sufficiency_fractions):
        raise ValueError(f"sufficiency_fractions must be non-empty, each in (0, 1], got {sufficiency_fractions}")
    examples = [_example(item) for item in data]
    if not examples:
        raise ValueError("evaluate got no examples")
    kind = _single_kind(examples)
    vocab = validation.vocabulary_size(model)
    for example in examples:  # every input checked before any compute
        prepare_inputs(example["inputs"], tokenizer, vocab=vocab)
    baseline = resolve_baseline(baseline_token_id, tokenizer, model)
    if baseline is None:
        raise ValueError("evaluation replaces tokens by a baseline token: pass baseline_token_id= or a tokenizer")
    rows: list[dict[str, Any]] = []
    reasons: dict[str, int] = {}
    with progress_bar(total=len(examples) * len(methods), desc="evaluate", enabled=progress) as bar:
        for index, example in enumerate(examples):
            result = _evaluate_example(
                model, example, index, methods, tokenizer, baseline, max_k, sufficiency_fractions,
                batch_size, method_kwargs or {}, bar,
            )
            if isinstance(result, str):
                reasons[result] = reasons.get(result, 0) + 1
                bar.update(len(methods))
            else:
                rows.extend(result)
    if not rows:
        raise ValueError(f"no example could be evaluated: {_reasons_text(reasons)}")
    return EvaluationResult(rows, list(methods), sum(reasons.values()), kind, reasons)


_TOO_SHORT = "fewer than 3 prompt tokens (no eligible token between the first and the last)"
_AT_CHANCE = "the continuation's log-prob is at or below chance level (nothing to remove)"
_ZERO = "the full target value is 0 (the normalisation |f| is undefined)"


def _reasons_text(reasons: dict[str, int]) -> str:
    return "; ".join(f"{count} x {reason}" for reason, count in reasons.items())


def _single_kind(examples: list[dict[str, Any]]) -> str:
    kinds: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        kinds.setdefault(example["kind"], []).append(index)
    if len(kinds) > 1:
        listing = "; ".join(f"{kind}: examples {_index_list(indices)}" for kind, indices in kinds.items())
        raise ValueError(
            f"the examples mix target kinds ({listing}); their normalised scores are not comparable, "
            "so evaluate each kind separately (the CLI does this for you)"
        )
    return next(iter(kinds))


def _index_list(indices: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


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
        return {"inputs": item[keys[0]], "target": item.get("target"), "contrast": item.get("contrast"),
                "kind": target_kind(item)}
    return {"inputs": item, "target": None, "contrast": None, "kind": "logit"}


def _evaluate_example(
    model: nn.Module, example: dict[str, Any], index: int, methods: list[str], tokenizer: Any, baseline: int,
    max_k: int, fractions: Sequence[float], batch_size: int, method_kwargs: dict[str, dict[str, Any]], bar: Any,
) -> list[dict[str, Any]] | str:
    """The rows of one example, or the reason it is skipped."""
    device = next(model.parameters()).device
    with eval_mode(model):  # restored by the last concurrent user
        prepared = prepare_inputs(example["inputs"], tokenizer, device=device,
                                  vocab=validation.vocabulary_size(model))
        prepared, spec = build_target(model, prepared, example["target"], tokenizer=tokenizer,
                                      contrast=example["contrast"])
        eligible = torch.arange(1, prepared.prompt_length - 1)
        if eligible.numel() == 0:
            return _TOO_SHORT
        with torch.no_grad():
            outputs = _forward(model, prepared.input_ids, prepared)
        full = float(spec.values(outputs).sum())
        normaliser = _normaliser(example["kind"], full, spec.n_components, _logits(outputs).shape[-1])
        if normaliser <= 0:
            return _AT_CHANCE if example["kind"] == "log-prob" else _ZERO
        target = spec.fn if spec.fn is not None else (example["target"] if isinstance(example["target"], str)
                                                      else spec.token_ids[0])
        rows = []
        for method in methods:
            kwargs = {"internal_batch_size": batch_size, "seed": index, "progress": False,
                      **method_kwargs.get(method, {})}
            scores = attribute(model, example["inputs"], method=method, target=target, tokenizer=tokenizer,
                               contrast=example["contrast"], baseline_token_id=baseline, **kwargs).scores
            comp, suff = _curves(model, prepared, spec, scores, eligible, baseline, max_k, fractions, batch_size)
            rows.append({
                "method": method, "example": index, "comprehensiveness": float((full - comp).mean() / normaliser),
                "sufficiency": float((full - suff).mean() / normaliser), "full_value": full,
                "normaliser": normaliser, "n_eligible": int(eligible.numel()),
            })
            bar.update(1)
        return rows


def _normaliser(kind: str, full: float, n_components: int, vocab: int) -> float:
    """``N`` of the module docstring: ``f - f_chance`` for log-probs, else ``|f|``."""
    if kind == "log-prob":
        return full + n_components * math.log(vocab)
    return abs(full)


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
