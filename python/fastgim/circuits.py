"""Component and edge attribution for circuit discovery on Hugging Face models (no TransformerLens).

Both run one clean forward + one backward (GIM by default, or the plain gradient with
``gim=None``), plus one no-grad forward on the corrupted input for the ``"corrupted"``
baseline. Scores estimate ``metric(patched) - metric(clean)`` to first order, where
"patched" replaces a component's output by its baseline value (attribution patching):
``score = sum((baseline_activation - clean_activation) * gradient)``.

Components (GQA-native: heads are query heads, read from the input of ``o_proj``):

* ``heads (layers, Hq)``: each head's output, i.e. its slice of the ``o_proj`` input;
* ``mlps (layers,)``: each MLP (or MoE block) output;
* ``resid (layers, B, L)``: each layer's output residual stream, per position.

Edges (EAP, Syed et al. 2023): upstream nodes write into the residual stream (``input``:
the token embeddings, ``a{l}.h{h}``: a head's ``o_proj`` contribution, ``m{l}``: an MLP);
downstream nodes read from it (``a{l}.h{h}<q>``, the K/V inputs ``a{l}.h{g}<k>`` /
``<v>`` per key/value head ``g`` (named ``a{l}.kv{g}<k>`` under GQA), ``m{l}`` and
``logits``). ``score(u -> v) = sum(delta_u * grad_v)`` where ``grad_v`` is the gradient at
``v``'s input through ``v`` alone (the gradient at the Q/K/V projection output mapped back
through the projection and the norm in front of it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastgim.adapters import ModelAdapter, get_adapter
from fastgim.params import no_parameter_grads
from fastgim.settings import GIMSettings
from fastgim.tracing import position_ids_from_mask, target_positions

__all__ = [
    "ComponentScores",
    "CircuitGraph",
    "component_attribution",
    "edge_attribution",
    "activation_patching",
    "BASELINES",
]

BASELINES = ("corrupted", "zero", "mean")
Metric = Callable[[torch.Tensor], torch.Tensor]
_DEFAULT_GIM = object()


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# ------------------------------------------------------------------------------------------------
# inputs, metric, GIM
# ------------------------------------------------------------------------------------------------
def _prepare(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             corrupted_input_ids: torch.Tensor | None, baseline: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    device = model.get_input_embeddings().weight.device
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be integer (seq,) or (batch, seq), got {tuple(input_ids.shape)} {input_ids.dtype}")
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.reshape(ids.shape).bool()
    corrupted = None
    if baseline == "corrupted":
        if corrupted_input_ids is None:
            raise ValueError("baseline='corrupted' needs corrupted_input_ids (same shape as input_ids); "
                             "or use baseline='zero' / 'mean'")
        corrupted = corrupted_input_ids.reshape(ids.shape).to(device)
    elif corrupted_input_ids is not None:
        raise ValueError(f"corrupted_input_ids given but baseline={baseline!r}; use baseline='corrupted'")
    return ids.to(device), mask.to(device), corrupted


def _default_metric(mask: torch.Tensor, target_token_id: Any, target_position: int,
                    contrast_token_id: Any) -> Metric:
    positions = target_positions(mask, target_position)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        picked = logits[rows, positions.to(logits.device)].float()
        target = picked.argmax(-1) if target_token_id is None else torch.as_tensor(
            target_token_id, device=logits.device).reshape(-1).expand(logits.shape[0])
        value = picked[rows, target]
        if contrast_token_id is not None:
            value = value - picked[rows, torch.as_tensor(contrast_token_id, device=logits.device).reshape(-1)
                                   .expand(logits.shape[0])]
        return value.sum()

    return metric


def _gim_context(model: nn.Module, gim: Any) -> contextlib.AbstractContextManager:
    if gim is _DEFAULT_GIM or gim is True:
        gim = GIMSettings()
    if gim is None or gim is False:
        return contextlib.nullcontext()
    if not isinstance(gim, GIMSettings):
        raise TypeError(f"gim must be a GIMSettings, True (defaults) or None (plain gradient), got {gim!r}")
    from fastgim.gim import GIM

    return GIM(model, **dataclasses.asdict(gim))




# ------------------------------------------------------------------------------------------------
# recording activations (and their gradients)
# ------------------------------------------------------------------------------------------------
class _Recorder:
    """Forward hooks storing activations by key; with ``grads=True`` also their gradients."""

    def __init__(self, adapter: ModelAdapter, *, grads: bool, edges: bool) -> None:
        self.adapter, self.want_grads, self.edges = adapter, grads, edges
        self.acts: dict[tuple, torch.Tensor] = {}
        self.grads: dict[tuple, torch.Tensor] = {}
        self.norm_grads: dict[int, dict[str, torch.Tensor]] = {}

    def _save(self, key: tuple, tensor: torch.Tensor, grad: bool = True) -> None:
        self.acts[key] = tensor.detach()
        if grad and self.want_grads and tensor.requires_grad:
            tensor.register_hook(lambda g, key=key: self.grads.__setitem__(key, g.detach()))

    @contextlib.contextmanager
    def hooks(self) -> Iterator[_Recorder]:
        a, handles = self.adapter, []
        try:
            for layer in range(a.num_layers):
                handles.append(a.get_o_proj(layer).register_forward_pre_hook(
                    lambda _m, args, k=("z", layer): self._save(k, args[0])))
                handles.append(a.get_mlp(layer).register_forward_hook(
                    lambda _m, _a, out, k=("mlp", layer): self._save(k, _first(out))))
                handles.append(a.get_layers()[layer].register_forward_hook(
                    lambda _m, _a, out, k=("resid", layer): self._save(k, _first(out), grad=not self.edges)))
                if self.edges:
                    handles += self._edge_hooks(layer)
            if self.edges:
                handles.append(a.get_final_norm().register_forward_pre_hook(
                    lambda _m, args: self._save(("final_in",), args[0])))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _edge_hooks(self, layer: int) -> list[Any]:
        a, handles = self.adapter, []
        for module, tag in a.qkv_modules(layer):
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, k=("qkv", layer, tag): self._save(k, out)))
        handles.append(a.get_mlp(layer).register_forward_pre_hook(
            lambda _m, args, k=("mlp_in", layer): self._save(k, args[0])))
        for kind, norm in (("attn_norm_in", a.get_attn_norm(layer)), ("mlp_norm_in", a.get_mlp_norm(layer))):
            if norm is not None:
                handles.append(norm.register_forward_pre_hook(
                    lambda _m, args, k=(kind, layer): self._save(k, args[0], grad=False)))
        return handles


def _run(model: nn.Module, recorder: _Recorder, ids: torch.Tensor, mask: torch.Tensor,
         embeds: torch.Tensor | None = None) -> torch.Tensor:
    inputs = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids}
    with recorder.hooks():
        out = model(**inputs, attention_mask=mask.long(), use_cache=False, **position_ids_from_mask(mask))
    return out.logits if hasattr(out, "logits") else _first(out)


def _baseline_acts(model: nn.Module, adapter: ModelAdapter, clean: _Recorder, baseline: str,
                   corrupted: torch.Tensor | None, mask: torch.Tensor, edges: bool) -> dict[tuple, torch.Tensor]:
    if baseline == "corrupted":
        rec = _Recorder(adapter, grads=False, edges=False)
        with torch.no_grad():
            _run(model, rec, corrupted, mask)
            rec.acts[("embed",)] = model.get_input_embeddings()(corrupted)
        return rec.acts
    out = {}
    weights = mask.to(torch.float32)[..., None]
    for key, value in clean.acts.items():
        if key[0] not in ("z", "mlp", "resid", "embed"):
            continue
        if baseline == "zero":
            out[key] = torch.zeros_like(value)
        else:
            mean = (value.float() * weights).sum((0, 1)) / weights.sum()
            out[key] = mean.to(value.dtype).expand_as(value)
    return out


def _clean_pass(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, metric: Metric, gim: Any,
                edges: bool) -> tuple[_Recorder, float]:
    adapter = get_adapter(model)
    rec = _Recorder(adapter, grads=True, edges=edges)
    with no_parameter_grads(model), torch.enable_grad(), _gim_context(model, gim):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = _run(model, rec, ids, mask, embeds)
        value = metric(logits)
        if value.dim() != 0:
            raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}; sum it over rows")
        (grad,) = torch.autograd.grad(value, embeds)
        rec.acts[("embed",)], rec.grads[("embed",)] = embeds.detach(), grad.detach()
        if edges:
            rec.norm_grads = _downstream_grads(adapter, rec)
    return rec, float(value.detach())


# ------------------------------------------------------------------------------------------------
# component attribution
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ComponentScores:
    """Attribution-patching scores (estimated metric change when a component is patched to baseline).

    ``heads (layers, Hq)``, ``heads_by_position (layers, B, L, Hq)``, ``mlps (layers,)``,
    ``mlps_by_position (layers, B, L)``, ``resid (layers, B, L)``: float32, CPU.
    """

    heads: torch.Tensor
    heads_by_position: torch.Tensor
    mlps: torch.Tensor
    mlps_by_position: torch.Tensor
    resid: torch.Tensor
    metric: float
    baseline: str
    gim: bool

    def ranking(self) -> list[tuple[str, float]]:
        """All heads (``a{l}.h{h}``) and MLPs (``m{l}``) sorted by |score|, largest first."""
        items = [(f"a{li}.h{h}", float(self.heads[li, h])) for li in range(self.heads.shape[0])
                 for h in range(self.heads.shape[1])]
        items += [(f"m{li}", float(self.mlps[li])) for li in range(self.mlps.shape[0])]
        return sorted(items, key=lambda item: -abs(item[1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (per-position tensors omitted except ``resid``)."""
        return {"metric": self.metric, "baseline": self.baseline, "gim": self.gim,
                "heads": self.heads.tolist(), "mlps": self.mlps.tolist(), "resid": self.resid.tolist()}


def component_attribution(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    corrupted_input_ids: torch.Tensor | None = None,
    baseline: str = "corrupted",
    metric: Metric | None = None,
    target_token_id: int | torch.Tensor | None = None,
    target_position: int = -1,
    contrast_token_id: int | torch.Tensor | None = None,
    gim: GIMSettings | bool | None = _DEFAULT_GIM,  # type: ignore[assignment]
) -> ComponentScores:
    """Score every attention head, MLP and per-position residual stream in one forward + backward.

    Args:
        model: Hugging Face causal LM (any layout :func:`fastgim.adapters.get_adapter` knows).
        input_ids: ``(seq,)`` / ``(batch, seq)`` clean token ids.
        attention_mask: ``(batch, seq)`` 0/1 padding mask (padded positions score 0).
        corrupted_input_ids: same shape, for ``baseline="corrupted"``.
        baseline: ``"corrupted"`` (activations on the corrupted input), ``"zero"`` or ``"mean"``
            (mean over the batch's real tokens).
        metric: ``callable(logits (B, L, V)) -> scalar``; default: the sum over rows of the
            target logit (argmax if ``target_token_id`` is None) at ``target_position`` (over real
            tokens, -1 = last), minus the contrast logit if ``contrast_token_id`` is given.
        gim: GIM settings (default ``GIMSettings()``), or None for the plain gradient.

    Returns:
        :class:`ComponentScores`.
    """
    ids, mask, corrupted = _prepare(model, input_ids, attention_mask, corrupted_input_ids, baseline)
    metric = metric or _default_metric(mask, target_token_id, target_position, contrast_token_id)
    rec, value = _clean_pass(model, ids, mask, metric, gim, edges=False)
    base = _baseline_acts(model, rec.adapter, rec, baseline, corrupted, mask, edges=False)
    a, real = rec.adapter, mask.to(torch.float32)[..., None]

    def effect(key: tuple) -> torch.Tensor:  # (B, L, ...) summed over the last (hidden) dim
        delta = (base[key].float() - rec.acts[key].float())
        return delta * rec.grads[key].float()

    heads = torch.stack([(effect(("z", li)) * real).unflatten(-1, (a.num_heads, -1)).sum(-1)
                         for li in range(a.num_layers)])
    mlps = torch.stack([(effect(("mlp", li)) * real).sum(-1) for li in range(a.num_layers)])
    resid = torch.stack([(effect(("resid", li)) * real).sum(-1) for li in range(a.num_layers)])
    return ComponentScores(heads.sum((1, 2)).cpu(), heads.cpu(), mlps.sum((1, 2)).cpu(), mlps.cpu(), resid.cpu(),
                           value, baseline, gim is not None and gim is not False)


# ------------------------------------------------------------------------------------------------
# edge attribution
# ------------------------------------------------------------------------------------------------
def _norm_vjp(norm: nn.Module | None, x: torch.Tensor | None, cotangents: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian products of ``norm`` at ``x`` for stacked cotangents ``(N, B, L, hidden)``."""
    if norm is None:
        return cotangents
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        y = norm(xr)
        return torch.stack([torch.autograd.grad(y, xr, c.to(y.dtype), retain_graph=True)[0] for c in cotangents])


def _downstream_grads(adapter: ModelAdapter, rec: _Recorder) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: gradients ``(N, B, L, hidden)`` at the residual stream for the q, k, v and mlp nodes."""
    out = {}
    for layer in range(adapter.num_layers):
        grads = {tag: rec.grads[("qkv", layer, tag)] for _m, tag in adapter.qkv_modules(layer)}
        dq, dk, dv = adapter.split_qkv(grads)
        wq, wk, wv = adapter.qkv_weights(layer)
        cot = {name: torch.einsum("blhd,hdk->hblk", g.to(w.dtype), w)
               for name, g, w in (("q", dq, wq), ("k", dk, wk), ("v", dv, wv))}
        stacked = torch.cat([cot["q"], cot["k"], cot["v"]])
        norm = adapter.get_attn_norm(layer)
        attn = _norm_vjp(norm, rec.acts.get(("attn_norm_in", layer)), stacked)
        mlp_norm = adapter.get_mlp_norm(layer)
        mlp = _norm_vjp(mlp_norm, rec.acts.get(("mlp_norm_in", layer)), rec.grads[("mlp_in", layer)][None])
        out[layer] = {"attn": attn.float(), "mlp": mlp.float()}
    return out


def _node_names(adapter: ModelAdapter) -> tuple[list[str], list[str], list[int], list[int]]:
    """Upstream / downstream names and each one's layer (input = -1, logits = num_layers)."""
    hq, hkv, n = adapter.num_heads, adapter.num_kv_heads, adapter.num_layers
    kv = "h" if hkv == hq else "kv"
    up, up_layer, down, down_layer = ["input"], [-1], [], []
    for li in range(n):
        up += [f"a{li}.h{h}" for h in range(hq)] + [f"m{li}"]
        up_layer += [li] * (hq + 1)
        down += [f"a{li}.h{h}<q>" for h in range(hq)]
        down += [f"a{li}.{kv}{g}<{s}>" for s in ("k", "v") for g in range(hkv)] + [f"m{li}"]
        down_layer += [li] * (hq + 2 * hkv + 1)
    return up, down + ["logits"], up_layer, down_layer + [n]


def _edge_allowed(adapter: ModelAdapter, up: list[str], down: list[str], up_layer: list[int],
                  down_layer: list[int]) -> torch.Tensor:
    allowed = torch.zeros(len(up), len(down), dtype=torch.bool)
    for j, (name, dl) in enumerate(zip(down, down_layer)):
        is_mlp = name.startswith("m")
        for i, (uname, ul) in enumerate(zip(up, up_layer)):
            same_layer_attn = ul == dl and uname.startswith("a")
            allowed[i, j] = ul < dl or (is_mlp and same_layer_attn and not adapter.parallel_residual)
    return allowed


def _upstream_deltas(adapter: ModelAdapter, rec: _Recorder, base: dict, mask: torch.Tensor) -> torch.Tensor:
    real = mask.to(torch.float32)[..., None]
    deltas = [(base[("embed",)].float() - rec.acts[("embed",)].float()) * real]
    for li in range(adapter.num_layers):
        dz = (base[("z", li)].float() - rec.acts[("z", li)].float()).unflatten(-1, (adapter.num_heads, -1))
        wo = adapter.o_proj_weight(li).float()
        deltas += list(torch.einsum("blhd,hkd->hblk", dz, wo) * real)
        deltas.append((base[("mlp", li)].float() - rec.acts[("mlp", li)].float()) * real)
    return torch.stack(deltas)


def edge_attribution(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    corrupted_input_ids: torch.Tensor | None = None,
    baseline: str = "corrupted",
    metric: Metric | None = None,
    target_token_id: int | torch.Tensor | None = None,
    target_position: int = -1,
    contrast_token_id: int | torch.Tensor | None = None,
    gim: GIMSettings | bool | None = _DEFAULT_GIM,  # type: ignore[assignment]
) -> CircuitGraph:
    """EAP edge scores between all residual-stream writers and readers (arguments as in
    :func:`component_attribution`).

    Returns:
        :class:`CircuitGraph` with ``scores (num_upstream, num_downstream)`` float32 (NaN where
        no edge exists), estimating the metric change when the edge carries the baseline value.
    """
    ids, mask, corrupted = _prepare(model, input_ids, attention_mask, corrupted_input_ids, baseline)
    adapter = get_adapter(model)
    if not adapter.linear_residual_writes:
        raise ValueError(f"edge attribution needs heads that write to the residual stream through o_proj alone; "
                         f"{type(model).__name__} has norms after attention/MLP (use component_attribution)")
    metric = metric or _default_metric(mask, target_token_id, target_position, contrast_token_id)
    rec, value = _clean_pass(model, ids, mask, metric, gim, edges=True)
    base = _baseline_acts(model, adapter, rec, baseline, corrupted, mask, edges=True)
    up, down, up_layer, down_layer = _node_names(adapter)
    with torch.no_grad():
        scores = _edge_scores(adapter, rec, base, mask)
    allowed = _edge_allowed(adapter, up, down, up_layer, down_layer)
    scores = torch.where(allowed, scores.cpu(), torch.tensor(float("nan")))
    return CircuitGraph(up, down, scores, value, adapter.num_layers, adapter.num_heads, adapter.num_kv_heads)


def _edge_scores(adapter: ModelAdapter, rec: _Recorder, base: dict, mask: torch.Tensor) -> torch.Tensor:
    deltas = _upstream_deltas(adapter, rec, base, mask).flatten(1)
    grads = [torch.cat([rec.norm_grads[li]["attn"], rec.norm_grads[li]["mlp"]]) for li in range(adapter.num_layers)]
    grads.append(rec.grads[("final_in",)].float()[None])
    return deltas @ torch.cat(grads).flatten(1).T


# ------------------------------------------------------------------------------------------------
# the graph
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CircuitGraph:
    """Edge scores ``scores[i, j]`` for ``upstream[i] -> downstream[j]`` (NaN = no edge / pruned)."""

    upstream: list[str]
    downstream: list[str]
    scores: torch.Tensor
    metric: float
    num_layers: int
    num_heads: int
    num_kv_heads: int

    def edges(self) -> list[tuple[str, str, float]]:
        """Present edges ``(upstream, downstream, score)`` sorted by |score|, largest first."""
        idx = (~torch.isnan(self.scores)).nonzero().tolist()
        items = [(self.upstream[i], self.downstream[j], float(self.scores[i, j])) for i, j in idx]
        return sorted(items, key=lambda e: -abs(e[2]))

    def _keep(self, keep: torch.Tensor) -> CircuitGraph:
        scores = torch.where(keep, self.scores, torch.tensor(float("nan")))
        return dataclasses.replace(self, scores=scores)

    def _rank_values(self, absolute: bool) -> torch.Tensor:
        values = self.scores.abs() if absolute else self.scores
        return torch.nan_to_num(values, nan=-float("inf"))

    def top_n(self, n: int, *, absolute: bool = True) -> CircuitGraph:
        """Keep the ``n`` highest-scoring edges (by |score| unless ``absolute=False``)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        flat = self._rank_values(absolute).flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        present = int((~torch.isnan(self.scores)).sum())
        keep[flat.topk(min(n, present)).indices] = True
        return self._keep(keep.view_as(self.scores))

    def components_of(self, downstream: str) -> list[str]:
        """The upstream components a downstream node belongs to (all query heads of a K/V group)."""
        if downstream == "logits":
            return []
        name, _, kind = downstream.partition("<")
        if not kind:
            return [name]
        layer, head = name.split(".")
        index, group = int(head.lstrip("hkv")), self.num_heads // self.num_kv_heads
        if kind.startswith("q"):
            return [name]
        return [f"{layer}.h{h}" for h in range(index * group, (index + 1) * group)]

    def greedy(self, n: int, *, absolute: bool = True) -> CircuitGraph:
        """Grow a graph from ``logits``: repeatedly add the best edge into a node already reached."""
        values = self._rank_values(absolute)
        reached_down = torch.zeros(len(self.downstream), dtype=torch.bool)
        reached_down[self.downstream.index("logits")] = True
        down_of = {name: [j for j, d in enumerate(self.downstream) if name in self.components_of(d)]
                   for name in self.upstream}
        keep = torch.zeros_like(self.scores, dtype=torch.bool)
        for _ in range(n):
            candidates = torch.where(reached_down[None, :] & ~keep, values, -float("inf"))
            best = int(candidates.argmax())
            if candidates.flatten()[best] == -float("inf"):
                break
            i, j = divmod(best, len(self.downstream))
            keep[i, j] = True
            reached_down[down_of[self.upstream[i]]] = True
        return self._keep(keep)

    def prune(self) -> CircuitGraph:
        """Drop edges not on a path ``input -> ... -> logits`` through the present edges."""
        present = ~torch.isnan(self.scores)
        reach_logits = {"logits"}
        changed = True
        while changed:
            changed = False
            for i, u in enumerate(self.upstream):
                if u in reach_logits:
                    continue
                if any(present[i, j] and (d in reach_logits or set(self.components_of(d)) & reach_logits)
                       for j, d in enumerate(self.downstream)):
                    reach_logits.add(u)
                    changed = True
        from_input = {"input"}
        changed = True
        while changed:
            changed = False
            for j, d in enumerate(self.downstream):
                comps = self.components_of(d)
                if all(c in from_input for c in comps) or not comps:
                    continue
                if any(present[i, j] and self.upstream[i] in from_input for i in range(len(self.upstream))):
                    from_input.update(comps)
                    changed = True
        keep = torch.zeros_like(present)
        for i, u in enumerate(self.upstream):
            for j, d in enumerate(self.downstream):
                tail_ok = d == "logits" or bool(set(self.components_of(d)) & reach_logits)
                keep[i, j] = present[i, j] and u in from_input and tail_ok
        return self._keep(keep)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: nodes, present edges with scores, metric and model shape."""
        return {"metric": self.metric, "num_layers": self.num_layers, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "upstream": self.upstream, "downstream": self.downstream,
                "edges": [{"from": u, "to": v, "score": s} for u, v, s in self.edges()]}

    def to_json(self, path: str | Path | None = None) -> str:
        """The graph as JSON text (written to ``path`` too if given)."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> CircuitGraph:
        """Inverse of :meth:`to_json` (a path or the JSON text)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        data = json.loads(text)
        scores = torch.full((len(data["upstream"]), len(data["downstream"])), float("nan"))
        for edge in data["edges"]:
            scores[data["upstream"].index(edge["from"]), data["downstream"].index(edge["to"])] = edge["score"]
        return cls(data["upstream"], data["downstream"], scores, data["metric"], data["num_layers"],
                   data["num_heads"], data["num_kv_heads"])

    def plot(self, path: str | Path, *, max_edges: int = 200) -> Path:
        """Draw the present edges (at most ``max_edges``, strongest first) to a PNG file.

        Nodes are laid out by layer (input at the bottom, logits at the top); blue edges
        have positive scores, red negative; width grows with |score|.
        """
        return _draw_graph(self, Path(path), max_edges)


def _node_position(name: str, num_layers: int, num_heads: int) -> tuple[float, float]:
    """(x, y) of a component in the plot: one row per attention / MLP sub-layer."""
    if name == "input":
        return (num_heads - 1) / 2, 0.0
    if name == "logits":
        return (num_heads - 1) / 2, 2.0 * num_layers + 1
    layer_text, _, head = name.partition(".")
    layer = int(layer_text[1:])
    if layer_text.startswith("m"):
        return (num_heads - 1) / 2, 2.0 * layer + 2
    return float(head.lstrip("h")), 2.0 * layer + 1


def _draw_graph(graph: CircuitGraph, path: Path, max_edges: int) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    edges = graph.edges()[:max_edges]
    fig, ax = plt.subplots(figsize=(max(6.0, graph.num_heads * 0.9), max(4.0, graph.num_layers * 1.4 + 2)))
    biggest = max((abs(s) for _u, _v, s in edges), default=1.0) or 1.0
    nodes = {"logits"}
    for u, v, score in reversed(edges):  # strongest drawn last, on top
        x0, y0 = _node_position(u, graph.num_layers, graph.num_heads)
        for comp in graph.components_of(v) or ["logits"]:
            x1, y1 = _node_position(comp, graph.num_layers, graph.num_heads)
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={
                "arrowstyle": "-|>", "lw": 0.5 + 3.5 * abs(score) / biggest, "alpha": 0.75,
                "color": "tab:blue" if score >= 0 else "tab:red", "connectionstyle": "arc3,rad=0.12"})
            nodes.add(comp)
        nodes.add(u)
    for name in nodes:
        x, y = _node_position(name, graph.num_layers, graph.num_heads)
        ax.scatter([x], [y], s=260, color="white", edgecolors="black", zorder=3)
        ax.annotate(name, (x, y), ha="center", va="center", fontsize=6, zorder=4)
    ax.set_xlim(-1, graph.num_heads)
    ax.set_ylim(-1, 2 * graph.num_layers + 2)
    ax.set_axis_off()
    ax.set_title(f"{len(edges)} edges (blue +, red -), metric {graph.metric:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# brute-force ground truth
# ------------------------------------------------------------------------------------------------
def activation_patching(
    model: nn.Module,
    input_ids: torch.Tensor,
    corrupted_input_ids: torch.Tensor,
    metric: Metric,
    *,
    attention_mask: torch.Tensor | None = None,
) -> ComponentScores:
    """Brute-force patching: ``metric(patched) - metric(clean)`` for every head and MLP.

    One forward per head and per MLP (``layers * (Hq + 1) + 2`` in all); each patches one
    component's output (the head's ``o_proj`` input slice / the MLP output) with its value on
    ``corrupted_input_ids``. ``resid`` and per-position fields are zeros (not computed).
    """
    ids, mask, corrupted = _prepare(model, input_ids, attention_mask, corrupted_input_ids, "corrupted")
    adapter = get_adapter(model)
    base = _Recorder(adapter, grads=False, edges=False)
    with torch.no_grad():
        _run(model, base, corrupted, mask)
        clean = float(metric(_run(model, _Recorder(adapter, grads=False, edges=False), ids, mask)))
        heads = torch.zeros(adapter.num_layers, adapter.num_heads)
        mlps = torch.zeros(adapter.num_layers)
        for layer in range(adapter.num_layers):
            for head in range(adapter.num_heads):
                heads[layer, head] = _patched(model, adapter, ids, mask, metric, base.acts, layer, head) - clean
            mlps[layer] = _patched(model, adapter, ids, mask, metric, base.acts, layer, None) - clean
    b, n = ids.shape
    return ComponentScores(heads, torch.zeros(adapter.num_layers, b, n, adapter.num_heads), mlps,
                           torch.zeros(adapter.num_layers, b, n), torch.zeros(adapter.num_layers, b, n), clean,
                           "corrupted", False)


def _patched(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor, metric: Metric,
             acts: dict, layer: int, head: int | None) -> float:
    if head is None:
        hook = adapter.get_mlp(layer).register_forward_hook(
            lambda _m, _a, out: (acts[("mlp", layer)], *out[1:]) if isinstance(out, tuple) else acts[("mlp", layer)])
    else:
        d = adapter.head_dim

        def patch(_m: nn.Module, args: tuple) -> tuple:
            z = args[0].clone()
            z[..., head * d:(head + 1) * d] = acts[("z", layer)][..., head * d:(head + 1) * d]
            return (z, *args[1:])

        hook = adapter.get_o_proj(layer).register_forward_pre_hook(patch)
    try:
        out = model(input_ids=ids, attention_mask=mask.long(), use_cache=False, **position_ids_from_mask(mask))
    finally:
        hook.remove()
    return float(metric(out.logits))
