"""GIM on any PyTorch model: a thread-local ``TorchFunctionMode`` (the path beside the HF registry).

Models whose attention does not route through transformers' ``AttentionInterface`` (nanoGPT-style and
research models, timm / torchtune-style blocks, transformers' StableLm, Falcon, Bloom, ...) get GIM from
:class:`GIMFunctionMode`, which :class:`fastgim.GIM` pushes for its block, in the entering thread only.
Nothing global is patched; other threads (and this thread after the block) run the plain ops.

What the mode does, on calls that build an autograd graph (grad enabled and an input requiring grad;
everything else, including the code inside fastgim's own ops and every backward, passes through):

* ``F.scaled_dot_product_attention`` runs as :func:`fastgim.attention` (the ``gim_fused`` op: Triton on
  CUDA, the torch backend on CPU), so the temperature and the Q/K/V scales act exactly as in the HF path.
  ``is_causal`` (top-left aligned as in SDPA when ``L != S``), boolean and additive ``attn_mask``
  (ALiBi-style biases included), ``scale`` and ``enable_gqa`` are honoured; ``dropout_p > 0`` is an error.
* ``F.softmax`` / ``torch.softmax`` / ``Tensor.softmax`` (and ``nn.Softmax``) in the *softmax scope*
  get the temperature backward: forward unchanged bit for bit, backward
  ``dS = P_T * (dP - rowsum(dP * P_T))`` with ``P_T = softmax(S / T)`` computed in float32 (float64 for
  float64) as
  ``P^(1/T)`` renormalised from the saved forward ``P`` (no more memory than the ordinary softmax).
  Scope ``"attention"`` (default, the GIM paper's intent): attention probabilities only, i.e. softmaxes
  over the last dim of 4-D ``(batch, heads, q, k)`` tensors, or of 3-D ``(batch * heads, q, k)`` tensors
  whose scores come from a product of two activations (``q @ k^T``; a router's ``x @ W^T`` has a weight
  operand); not MoE routers, gating or output distributions. ``"all"``: every softmax in the forward,
  as gim-explain does (attention ones also get the Q/K/V scales). Or a callable ``(tensor, dim) -> bool``.
  For hand-written attention the Q/K/V scales act where the eager maths has them: the gradients into
  the two operands of the ``q @ k^T`` product behind the scores (found in the autograd graph: matmul,
  bmm, baddbmm, einsum) and into ``V`` in the ``P @ V`` product that consumes the probabilities.
* ``F.layer_norm`` / ``F.rms_norm`` (hence ``nn.LayerNorm``, ``nn.RMSNorm`` and any class calling them)
  get frozen statistics: forward bit for bit the original call, backward with the statistic constant.
  Norm classes with hand-written maths (``LlamaRMSNorm``-style) are patched per module as in the HF path
  (:mod:`fastgim.norm_patching`); an unknown one is an error naming it.

Gated MLPs get the gate / up scales from :mod:`fastgim.mlp_patching` (same module-pattern rules).

After each forward of the model inside the block the mode checks that it saw an attention op (an SDPA
call, an attention softmax or ``gim_fused`` attention) when an attention rule is on, and that every
attention softmax's probabilities met a ``P @ V`` product when ``v_scale`` is on; otherwise it raises
``TypeError`` naming what is missing (a model it cannot serve exactly is never a silent plain gradient).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fastgim.mlp_patching import scale_gradient
from fastgim.norm_patching import patch_norms
from fastgim.settings import GIMSettings, current_settings

SoftmaxScope = str | Callable[[torch.Tensor, int], bool]
SOFTMAX_SCOPES = ("attention", "all")

_SOFTMAXES = (F.softmax, torch.softmax, torch.Tensor.softmax)
_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.einsum)
_LAYER_NORMS = (F.layer_norm,)
_RMS_NORMS = (F.rms_norm,) + ((torch.rms_norm,) if hasattr(torch, "rms_norm") else ())
_UNSUPPORTED = {
    F.multi_head_attention_forward: (
        "nn.MultiheadAttention / F.multi_head_attention_forward (its attention runs inside one composite "
        "function the mode cannot see into); use F.scaled_dot_product_attention in the model, or "
        "softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None"
    ),
}

# Autograd nodes between the attention scores and their q @ k^T product (scaling, masks, softcap, casts).
_SCORE_PASS = frozenset({
    "MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0", "ToCopyBackward0", "ViewBackward0",
    "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0", "TanhBackward0", "MaskedFillBackward0",
    "WhereBackward0", "ExpandBackward0", "SliceBackward0", "PermuteBackward0", "TransposeBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "UnsqueezeBackward0", "AsStridedBackward0", "MulBackward1",
    "DivBackward1", "AddBackward1", "SubBackward1", "MaximumBackward0", "ClampMinBackward0", "ClampBackward1",
})
# Product nodes and the positions of (query side, key side) among their inputs.
_PRODUCTS = {"BmmBackward0": (0, 1), "MmBackward0": (0, 1), "BaddbmmBackward0": (1, 2), "MatmulBackward0": (0, 1)}
# Nodes between the attention probabilities and the P @ V product (casts, dropout, head masks, views).
_PROBS_PASS = frozenset({
    "ToCopyBackward0", "NativeDropoutBackward0", "MulBackward0", "ViewBackward0", "UnsafeViewBackward0",
    "ReshapeAliasBackward0", "CloneBackward0", "ExpandBackward0", "SliceBackward0", "MaskedFillBackward0",
})


# --------------------------------------------------------------------------- autograd pieces


class _TemperatureSoftmax(torch.autograd.Function):
    """Forward: the original softmax call (bit for bit). Backward: ``P_T * (g - rowsum(g * P_T))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, call: Callable[[torch.Tensor], torch.Tensor], dim: int,
                temperature: float, is_attention: bool) -> torch.Tensor:
        probs = call(x)
        ctx.save_for_backward(probs)
        ctx.dim, ctx.temperature, ctx.x_dtype = dim, temperature, x.dtype
        ctx.fastgim_attention_probs = is_attention  # read by the P @ V detection (on the backward node)
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        p32, g32 = _upcast(probs), _upcast(grad)
        if ctx.temperature != 1.0:
            powered = p32.sqrt() if ctx.temperature == 2.0 else p32.pow(1.0 / ctx.temperature)
            p32 = powered / powered.sum(ctx.dim, keepdim=True)
        dx = p32 * (g32 - (g32 * p32).sum(ctx.dim, keepdim=True))
        return dx.to(ctx.x_dtype), None, None, None, None


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it is float64 (the backward's compute dtype)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return _upcast(t).reshape(-1, n)


class _FrozenNorm(torch.autograd.Function):
    """Forward: the original ``F.layer_norm`` / ``F.rms_norm`` call. Backward: statistic held constant."""

    @staticmethod
    def forward(ctx, x, weight, bias, call, kind: str, normalized_shape: tuple[int, ...], eps: float):
        ctx.save_for_backward(x, weight, bias)
        ctx.kind, ctx.n, ctx.eps = kind, math.prod(normalized_shape), eps
        return call(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        n = ctx.n
        x32, g32 = _rows(x, n), _rows(grad, n)
        if ctx.kind == "layer":
            centred = x32 - x32.mean(-1, keepdim=True)
            rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + ctx.eps)
        else:
            centred = x32
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + ctx.eps)
        normed = centred * rstd
        gw = g32 * _upcast(weight).reshape(n) if weight is not None else g32
        if ctx.kind == "layer":
            gw = gw - gw.mean(-1, keepdim=True)
        dx = (gw * rstd).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        dweight = (g32 * normed).sum(0).reshape(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = g32.sum(0).reshape(bias.shape).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None


def _scale_product_inputs(node, positions: tuple[int, int], scales: tuple[float, float]) -> None:
    """Multiply the gradients a product node sends to its (query, key) inputs."""

    def hook(grad_inputs, _grad_outputs):
        grads = list(grad_inputs)
        for position, scale in zip(positions, scales):
            if position < len(grads) and grads[position] is not None and scale != 1.0:
                grads[position] = grads[position] * scale
        return tuple(grads)

    node.register_hook(hook)


def _find_nodes(start, passes: frozenset, match: Callable, limit: int = 24) -> list:
    """Nodes satisfying ``match`` reachable from ``start`` through ``passes`` node types (breadth first)."""
    found, frontier, visited = [], [start], set()
    while frontier and len(visited) < limit:
        node = frontier.pop(0)
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if match(node):
            found.append(node)
        elif type(node).__name__ in passes:
            frontier.extend(next_node for next_node, _ in node.next_functions)
    return found


def _is_product(node) -> bool:
    return type(node).__name__ in _PRODUCTS


_LEAF_PASS = frozenset({"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "ExpandBackward0",
                        "ReshapeAliasBackward0", "UnsafeViewBackward0", "ToCopyBackward0", "CloneBackward0"})


def _operands_are_activations(product) -> bool:
    """True if neither (query, key) operand of ``product`` is a parameter (a leaf) or constant."""
    for position in _PRODUCTS[type(product).__name__]:
        node = product.next_functions[position][0] if position < len(product.next_functions) else None
        for _ in range(6):
            if node is None or type(node).__name__ == "AccumulateGrad":
                return False
            if type(node).__name__ not in _LEAF_PASS:
                break
            node = node.next_functions[0][0]
    return True


def _is_attention_probs(node) -> bool:
    return bool(getattr(node, "fastgim_attention_probs", False))


# --------------------------------------------------------------------------- argument parsing


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _softmax_args(func, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int | None]:
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None and func is F.softmax:  # torch's legacy implicit dim
        dim = 0 if x.dim() in (0, 1, 3) else 1
    return x, (None if dim is None else dim % max(x.dim(), 1))


def _substitute_first(func, args: tuple, kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    if args:
        return lambda x: func(x, *args[1:], **kwargs)
    key = "input" if "input" in kwargs else "self"
    return lambda x: func(**{**kwargs, key: x})


_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _sdpa_args(args: tuple, kwargs: dict) -> dict:
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_NAMES, args))
    unknown = set(kwargs) - set(_SDPA_NAMES)
    if unknown:
        raise TypeError(f"scaled_dot_product_attention got unexpected arguments {sorted(unknown)}")
    bound.update(kwargs)
    return bound


def _broadcast_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool):
    """``k``, ``v`` with SDPA's broadcasting of size-1 batch / head dims; GQA heads stay unrepeated."""
    batch, heads = q.shape[0], q.shape[1]
    for name, t in (("key", k), ("value", v)):
        ok_batch = t.shape[0] in (1, batch)
        ok_heads = t.shape[1] in (1, heads) or (enable_gqa and heads % t.shape[1] == 0)
        if not (ok_batch and ok_heads):
            raise ValueError(
                f"scaled_dot_product_attention: {name} {tuple(t.shape)} does not broadcast against query "
                f"{tuple(q.shape)} (enable_gqa={enable_gqa})"
            )
    if k.shape[0] != batch:
        k = k.expand(batch, *k.shape[1:])
    if v.shape[0] != batch:
        v = v.expand(batch, *v.shape[1:])
    return k, v


def _sdpa_mask(attn_mask: torch.Tensor | None, is_causal: bool, q: torch.Tensor, k: torch.Tensor):
    """``(mask, causal)`` for :func:`fastgim.attention` reproducing SDPA's masking exactly.

    SDPA's ``is_causal`` keeps ``j <= i`` (top-left aligned); fastgim's causal flag is bottom-right
    aligned, the same only when ``L == S``; otherwise the causal part becomes a boolean mask.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    if attn_mask is None:
        if not is_causal or lq == lk:
            return None, bool(is_causal)
        return torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()[None, None], False
    if attn_mask.dim() > 4:
        raise ValueError(f"scaled_dot_product_attention's attn_mask must have at most 4 dims, got {attn_mask.dim()}")
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.shape[-1] == 1 and lk != 1:
        mask = mask.expand(*mask.shape[:-1], lk)
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))
    return mask, False


# --------------------------------------------------------------------------- the mode

COMPILE_MESSAGE = (
    "fastgim's GIM function mode runs eagerly: torch.compile cannot trace it (the compiled frames fall back to "
    "eager execution inside the GIM block; with fullgraph=True this is an error). Compile outside the GIM block, "
    "or use a transformers model served by the gim_fused registry path, whose attention op compiles."
)


@dataclasses.dataclass
class _Seen:
    """What the mode saw in this block: attention ops and P @ V products."""

    attention: int = 0
    attention_softmaxes: int = 0
    pv_products: int = 0


def _resolve_scope(scope: SoftmaxScope) -> Callable[[torch.Tensor, int, bool], bool]:
    """``in_scope(tensor, dim, looks_like_attention)``."""
    if callable(scope):
        return lambda x, dim, _attention: bool(scope(x, dim))
    if scope == "attention":
        return lambda x, dim, attention: attention
    if scope == "all":
        return lambda x, dim, attention: True
    raise ValueError(f"softmax_scope must be one of {', '.join(SOFTMAX_SCOPES)} or a callable(tensor, dim) -> bool, "
                     f"got {scope!r}")


class GIMFunctionMode(TorchFunctionMode):
    """The thread-local mode applying GIM's rules to functional calls (see the module docstring).

    Args:
        attention: intercept attention (SDPA, eager q @ k^T / softmax / P @ V); False on the registry
            path, where only extra softmaxes (``softmax_scope="all"``) need the mode.
        softmax_scope: ``"attention"``, ``"all"`` or a callable ``(tensor, dim) -> bool``.
    """

    def __init__(self, *, attention: bool = True, softmax_scope: SoftmaxScope = "attention") -> None:
        super().__init__()
        self.attention = attention
        self.in_scope = _resolve_scope(softmax_scope)
        self.seen = _Seen()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if torch.compiler.is_compiling():
            # Dynamo must not trace the rules into a graph (autograd hooks, context variables): this error
            # makes it fall back to running the frame eagerly, under the mode (fullgraph=True: the error).
            raise RuntimeError(COMPILE_MESSAGE)
        kwargs = kwargs or {}
        settings = current_settings()
        if settings is None:
            return func(*args, **kwargs)
        if func in _UNSUPPORTED and self.attention and _attention_rules_on(settings):
            raise TypeError(f"GIM cannot apply its attention rules to {_UNSUPPORTED[func]}")
        if func is F.scaled_dot_product_attention and self.attention:
            return self._sdpa(func, args, kwargs)
        if func in _SOFTMAXES:
            return self._softmax(func, args, kwargs, settings)
        if func in _MATMULS and self.attention:
            return self._matmul(func, args, kwargs, settings)
        if (func in _LAYER_NORMS or func in _RMS_NORMS) and settings.freeze_norm and self.attention:
            return self._norm(func, args, kwargs)
        if str(func) == "fastgim.attention_forward.default":
            self.seen.attention += 1  # gim_fused attention (a registry-served submodule)
        return func(*args, **kwargs)

    # ---- attention

    def _sdpa(self, func, args: tuple, kwargs: dict):
        from fastgim.ops.attention import attention

        a = _sdpa_args(args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        self.seen.attention += 1
        if not _needs_grad(q, k, v):
            return func(*args, **kwargs)
        if a["dropout_p"]:
            raise ValueError(
                f"GIM has no attention dropout (scaled_dot_product_attention got dropout_p={a['dropout_p']}): "
                "call model.eval() or set the model's attention dropout to 0"
            )
        if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
            raise ValueError(
                f"GIM supports scaled_dot_product_attention on 4-D (batch, heads, L, E) or 3-D (batch, L, E) "
                f"inputs, got query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}"
            )
        squeeze = q.dim() == 3
        if squeeze:
            q, k, v = q[:, None], k[:, None], v[:, None]
        k, v = _broadcast_kv(q, k, v, bool(a["enable_gqa"]))
        mask, causal = _sdpa_mask(a["attn_mask"], bool(a["is_causal"]), q, k)
        out = attention(q, k, v, causal=causal, scale=a["scale"], attention_mask=mask)
        return out[:, 0] if squeeze else out

    def _softmax(self, func, args: tuple, kwargs: dict, settings: GIMSettings):
        x, dim = _softmax_args(func, args, kwargs)
        if not isinstance(x, torch.Tensor) or dim is None or not _needs_grad(x):
            return func(*args, **kwargs)
        products = self._attention_products(x, dim)
        if not self.in_scope(x, dim, products is not None):
            return func(*args, **kwargs)
        is_attention = products is not None and self._scale_qk(x, products, settings)
        temperature = 1.0 if settings.softmax_temperature is None else float(settings.softmax_temperature)
        if temperature == 1.0 and not is_attention:
            return func(*args, **kwargs)
        if is_attention:
            self.seen.attention += 1
            self.seen.attention_softmaxes += 1
        return _TemperatureSoftmax.apply(x, _substitute_first(func, args, kwargs), dim, temperature, is_attention)

    def _attention_products(self, x: torch.Tensor, dim: int) -> list | None:
        """The product nodes behind ``x`` if this softmax is attention, else None.

        Attention: over the last dim of a 4-D tensor (``(batch, heads, q, k)``), or of a 3-D tensor
        (``(batch * heads, q, k)``) whose scores come from one product of two activations (``q @ k^T``;
        a router's ``x @ W^T`` has a weight operand).
        """
        if not self.attention or dim != x.dim() - 1 or x.dim() not in (3, 4):
            return None
        products = _find_nodes(x.grad_fn, _SCORE_PASS, _is_product)
        if x.dim() == 3 and not (len(products) == 1 and _operands_are_activations(products[0])):
            return None
        return products

    def _scale_qk(self, scores: torch.Tensor, products: list, settings: GIMSettings) -> bool:
        """Hook the q @ k^T product behind ``scores``; True if found (the softmax is attention)."""
        q_scale = 1.0 if settings.q_scale is None else float(settings.q_scale)
        k_scale = 1.0 if settings.k_scale is None else float(settings.k_scale)
        if len(products) != 1:
            if q_scale == 1.0 and k_scale == 1.0:
                return bool(products)
            raise TypeError(
                f"GIM found a softmax over the last dim of a {scores.dim()}-D tensor {tuple(scores.shape)} (attention "
                f"probabilities) but {'no' if not products else len(products)} q @ k^T product(s) behind its "
                "scores (matmul / bmm / baddbmm / einsum, then scaling, masks or softcap), so the q/k gradient "
                "scales cannot be placed. Use F.scaled_dot_product_attention in the model, pass q_scale=None "
                "and k_scale=None, or exclude this softmax with softmax_scope=callable(tensor, dim) -> bool."
            )
        if q_scale != 1.0 or k_scale != 1.0:
            _scale_product_inputs(products[0], _PRODUCTS[type(products[0]).__name__], (q_scale, k_scale))
        return True

    def _matmul(self, func, args: tuple, kwargs: dict, settings: GIMSettings):
        operands = list(args[1:]) if func is torch.einsum else list(args[:2])
        if func is torch.einsum and len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        if len(operands) != 2 or not all(isinstance(t, torch.Tensor) for t in operands):
            return func(*args, **kwargs)
        probs, values = operands
        if not _needs_grad(probs) or probs.grad_fn is None:
            return func(*args, **kwargs)
        if not _find_nodes(probs.grad_fn, _PROBS_PASS, _is_attention_probs, limit=8):
            return func(*args, **kwargs)
        self.seen.pv_products += 1
        v_scale = 1.0 if settings.v_scale is None else float(settings.v_scale)
        values = scale_gradient(values, v_scale)
        if func is torch.einsum:
            return func(args[0], probs, values, **kwargs)
        return func(probs, values, *args[2:], **kwargs)

    # ---- norms

    def _norm(self, func, args: tuple, kwargs: dict):
        kind = "layer" if func in _LAYER_NORMS else "rms"
        names = ("input", "normalized_shape", "weight", "bias", "eps") if kind == "layer" else \
            ("input", "normalized_shape", "weight", "eps")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        x, weight, bias = bound["input"], bound.get("weight"), bound.get("bias")
        if not _needs_grad(x, weight, bias):
            return func(*args, **kwargs)
        shape = bound["normalized_shape"]
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        eps = bound.get("eps")
        if eps is None:
            eps = 1e-5 if kind == "layer" else torch.finfo(x.dtype).eps
        other = {key: value for key, value in bound.items() if key not in ("input", "weight", "bias")}
        if kind == "layer":
            def call(x_, w_, b_):
                return func(x_, weight=w_, bias=b_, **other)
        else:
            def call(x_, w_, _b):
                return func(x_, weight=w_, **other)
        return _FrozenNorm.apply(x, weight, bias, call, kind, shape, float(eps))


def _attention_rules_on(settings: GIMSettings) -> bool:
    return any(
        value is not None and float(value) != 1.0
        for value in (settings.softmax_temperature, settings.q_scale, settings.k_scale, settings.v_scale)
    )


# --------------------------------------------------------------------------- norm modules


_FUNCTIONAL_NORM_CACHE: dict[type, bool] = {}
_CACHE_LOCK = threading.Lock()


class _NormCallRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.called = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _LAYER_NORMS or func in _RMS_NORMS:
            self.called = True
        return func(*args, **(kwargs or {}))


def _norm_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
        return weight.shape[-1]
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    return None


def calls_functional_norm(module: nn.Module) -> bool:
    """True if the module's forward computes its norm by ``F.layer_norm`` / ``F.rms_norm`` (probed once per class)."""
    cls = type(module)
    if cls.forward in (nn.LayerNorm.forward, nn.RMSNorm.forward):
        return True
    with _CACHE_LOCK:
        if cls in _FUNCTIONAL_NORM_CACHE:
            return _FUNCTIONAL_NORM_CACHE[cls]
    width = _norm_width(module)
    recorder = _NormCallRecorder()
    if width is not None:
        weight = getattr(module, "weight", None)
        dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
        device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
        x = torch.randn(2, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        with torch.no_grad(), contextlib.suppress(RuntimeError, TypeError, ValueError), recorder:
            cls.forward(module, x)
    with _CACHE_LOCK:
        _FUNCTIONAL_NORM_CACHE[cls] = recorder.called
    return recorder.called


def patch_norm_modules(model: nn.Module) -> Callable[[], None]:
    """Frozen-statistics forwards for the norm modules the mode's functional interception does not reach.

    Norms whose forward calls ``F.layer_norm`` / ``F.rms_norm`` are left alone (the mode freezes the call);
    the others go through :func:`fastgim.norm_patching.patch_norms` (``TypeError`` naming an unknown class).
    """
    return patch_norms(model, skip=calls_functional_norm)


# --------------------------------------------------------------------------- activation


_ACTIVE_MODE: contextvars.ContextVar[GIMFunctionMode | None] = contextvars.ContextVar(
    "fastgim_function_mode", default=None
)


def _check_forward(mode: GIMFunctionMode, before: _Seen, model: nn.Module, settings: GIMSettings) -> None:
    name = type(model).__name__
    attention_ops = mode.seen.attention - before.attention
    if attention_ops == 0 and _attention_rules_on(settings):
        raise TypeError(
            f"GIM saw no attention op in {name}'s forward: no F.scaled_dot_product_attention call and no softmax "
            "over the last dim of a (batch, heads, q, k) score tensor fed by a q @ k^T product, on tensors that "
            "require grad, so the softmax temperature and the Q/K/V scales would silently not apply. fastgim's function mode needs the model's attention "
            "to use one of those; for a model without attention pass softmax_temperature=None, q_scale=None, "
            "k_scale=None, v_scale=None."
        )
    softmaxes = mode.seen.attention_softmaxes - before.attention_softmaxes
    products = mode.seen.pv_products - before.pv_products
    if settings.v_scale not in (None, 1.0) and products < softmaxes:
        raise TypeError(
            f"GIM saw {softmaxes} attention softmax(es) in {name}'s forward but only {products} P @ V product(s) "
            "consuming their probabilities (matmul / bmm / einsum after casts, dropout or views), so v_scale "
            "cannot be placed. Use F.scaled_dot_product_attention in the model or pass v_scale=None."
        )


def install_forward_check(model: nn.Module) -> Callable[[], None]:
    """Hooks on ``model`` running :func:`_check_forward` after each forward inside an active mode; returns the undo."""
    snapshots: dict[int, list[_Seen]] = {}

    def before(_module, _args):
        mode = _ACTIVE_MODE.get()
        if mode is not None:
            snapshots.setdefault(id(mode), []).append(dataclasses.replace(mode.seen))

    def after(module, _args, _output):
        mode = _ACTIVE_MODE.get()
        stack = snapshots.get(id(mode)) if mode is not None else None
        if not stack:
            return
        start = stack.pop()
        if not stack:
            snapshots.pop(id(mode), None)
        settings = current_settings()
        if settings is not None:
            _check_forward(mode, start, module, settings)

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo


def run_under_active_mode(fn: Callable, *args, **kwargs):
    """Call ``fn`` with this context's GIM function mode pushed if it is not on the stack.

    The mode stack is empty while autograd runs a backward, so activation checkpointing's recomputation
    (:mod:`fastgim.checkpointing`) must re-enter the mode of the forward to rebuild the same graph;
    ``_ACTIVE_MODE`` travels with the copied context.
    """
    mode = _ACTIVE_MODE.get()
    if mode is None or any(m is mode for m in torch.overrides._get_current_function_mode_stack()):
        return fn(*args, **kwargs)
    with mode:
        return fn(*args, **kwargs)


@contextlib.contextmanager
def activate(*, attention: bool, softmax_scope: SoftmaxScope) -> Iterator[GIMFunctionMode]:
    """Push a :class:`GIMFunctionMode` in this thread for the block (reads the GIM settings at call time)."""
    mode = GIMFunctionMode(attention=attention, softmax_scope=softmax_scope)
    token = _ACTIVE_MODE.set(mode)
    try:
        with mode:
            yield mode
    finally:
        _ACTIVE_MODE.reset(token)


def check_scope(scope: SoftmaxScope) -> None:
    """``ValueError`` unless ``scope`` is a known softmax scope name or a callable."""
    _resolve_scope(scope)
