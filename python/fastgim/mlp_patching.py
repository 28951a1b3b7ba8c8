"""Gated MLPs: GIM's gate / up gradient scales (rule 4), forward unchanged bit for bit.

In ``act(gate) * up`` the gradient into the gate branch is multiplied by ``gate_scale``
and the gradient into the up branch by ``up_scale``. Scaling the gradient of a branch's
pre-activation is the same thing (the chain rule is linear), so the rule is applied by
identity functions whose backward multiplies, placed on the projection outputs:

* ``gate_proj`` / ``up_proj`` linears (Llama, Mistral, Qwen, Gemma, OLMo2, MoE shared
  experts, ...): forward hooks on the two linears.
* a fused ``gate_up_proj`` linear split into ``[gate, up]`` halves (Phi-3, GLM): a forward
  hook on it scaling the two halves.
* MoE experts with 3-D ``gate_up_proj`` weights (Mixtral, Qwen2-MoE, Qwen3-MoE in
  transformers 5): the eager path's ``F.linear`` with an expert's ``gate_up_proj`` slice
  is intercepted by a torch-function mode; the batched / grouped paths get an instance
  ``_apply_gate`` that scales the halves first.

On devices where the fused kernels run (CUDA; or ``FASTGIM_NORM_BACKEND=triton`` under the
Triton interpreter), known ``gate_proj`` / ``up_proj`` MLP classes compute ``act(gate) * up``
and its scaled backward in one kernel (:func:`fastgim.ops.norms.gated_activation`); their
forward then equals the module's up to one rounding of the product.

The scales are read from the context variable when the forward runs, so a patched
model behaves exactly as an unpatched one outside a GIM context. A module that looks
like a gated MLP but fits none of these is an error naming its class.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fastgim.norm_patching import set_forward
from fastgim.settings import current_settings

#: Classes with a fused ``gate_up_proj`` linear whose output is ``[gate, up]`` along the last dim.
FUSED_GATE_FIRST = frozenset({"Phi3MLP", "GlmMLP", "Glm4MLP", "Phi4MultimodalAudioMLP"})

#: MoE experts classes with 3-D ``gate_up_proj`` ``[gate; up]`` weights and the eager ``F.linear`` loop, for
#: transformers versions whose experts lack the ``use_experts_implementation`` attributes.
KNOWN_EXPERTS = frozenset({"MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts"})


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _ScaleHalvesGrad(torch.autograd.Function):
    """Identity forward; the backward scales the first half of the last dim and the second half apart."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, first: float, second: float) -> torch.Tensor:
        ctx.scales = (first, second)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = grad.chunk(2, dim=-1)
        return torch.cat((a * ctx.scales[0], b * ctx.scales[1]), dim=-1), None, None


def _active_scales() -> tuple[float, float] | None:
    """``(gate_scale, up_scale)`` of the active GIM settings, or None when both rules are off."""
    settings = current_settings()
    if settings is None or (settings.gate_scale is None and settings.up_scale is None):
        return None
    gate = 1.0 if settings.gate_scale is None else float(settings.gate_scale)
    up = 1.0 if settings.up_scale is None else float(settings.up_scale)
    return gate, up


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged in the forward; its gradient multiplied by ``scale`` in the backward."""
    return x if scale == 1.0 or not x.requires_grad else _ScaleGrad.apply(x, scale)


def scale_halves_gradient(x: torch.Tensor, first: float, second: float) -> torch.Tensor:
    """``x`` unchanged; the gradient of ``x[..., :n/2]`` times ``first``, of ``x[..., n/2:]`` times ``second``."""
    if (first == 1.0 and second == 1.0) or not x.requires_grad:
        return x
    return _ScaleHalvesGrad.apply(x, first, second)


# --------------------------------------------------------------------------- classification


def _gated_kind(module: nn.Module) -> str | None:
    """``"split"``, ``"fused"``, ``"experts"``, ``"unknown"`` (looks gated, unsupported) or None (not gated)."""
    gate_proj, up_proj = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    if isinstance(gate_proj, nn.Linear) and isinstance(up_proj, nn.Linear):
        return "split"
    fused = getattr(module, "gate_up_proj", None)
    if isinstance(fused, nn.Linear):
        return "fused" if type(module).__name__ in FUSED_GATE_FIRST else "unknown"
    if isinstance(fused, torch.Tensor) and fused.dim() == 3:
        if hasattr(module, "is_concatenated"):  # transformers' use_experts_implementation decorator
            experts_ok = bool(getattr(module, "has_gate", False) and module.is_concatenated)
        else:  # older transformers: the eager loop only
            experts_ok = type(module).__name__ in KNOWN_EXPERTS
        return "experts" if experts_ok else "unknown"
    if isinstance(fused, (nn.Module, torch.Tensor)):
        return "unknown"
    own = set(module._modules) | set(module._parameters)
    if ("w1" in own and "w3" in own) or ("wi_0" in own and "wi_1" in own):
        return "unknown"
    if isinstance(gate_proj, (nn.Module, torch.Tensor)) and "Router" not in type(module).__name__:
        return "unknown" if "MLP" in type(module).__name__ or "Expert" in type(module).__name__ else None
    return None


def find_gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every gated MLP in ``model`` as ``(qualified name, module, kind)``; ``TypeError`` naming unknown ones."""
    found = []
    for name, module in model.named_modules():
        kind = _gated_kind(module)
        if kind == "unknown":
            cls = type(module)
            raise TypeError(
                f"GIM cannot apply the gate/up gradient scales to {cls.__module__}.{cls.__name__} "
                f"(module {name!r}): it looks like a gated MLP but its layout is not a known one (gate_proj/up_proj "
                "linears, a [gate, up] gate_up_proj linear of a known class, or transformers MoE experts). Pass "
                "gate_scale=None and up_scale=None to skip this rule, or add the class to "
                "fastgim.mlp_patching.FUSED_GATE_FIRST if its gate_up_proj output is [gate, up]."
            )
        if kind is not None:
            found.append((name, module, kind))
    return found


# --------------------------------------------------------------------------- patches


def _branch_hook(which: int) -> Callable:
    def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
        scales = _active_scales()
        if scales is None or _FUSED_RUNNING.get():
            return None
        return scale_gradient(output, scales[which])

    return hook


#: Classes whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: on devices where
#: the fused kernels run, GIM computes ``act(gate) * up`` with the scales inside one kernel.
FUSABLE_SPLIT_MLPS = frozenset({
    "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP", "Olmo2MLP",
    "Qwen2MoeMLP", "Qwen3MoeMLP", "MixtralMLP", "GraniteMLP",
})

#: Also route the fusable MLPs through ``gated_activation`` where it runs on PyTorch ops (CPU): its
#: backward applies the scales with fewer full-size temporaries than the hooks, and it keeps
#: ``gate`` and ``up`` for the backward instead of ``act(gate)``, ``gate`` and ``up``.
FUSE_ON_CPU = True

_FUSED_RUNNING: contextvars.ContextVar[bool] = contextvars.ContextVar("fastgim_fused_mlp", default=False)


def _activation_name(module: nn.Module) -> str | None:
    from fastgim.ops.norms import ACTIVATIONS

    config = getattr(module, "config", None)
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    return name if isinstance(name, str) and name in ACTIVATIONS else None


def _patch_fused_split(module: nn.Module, activation: str) -> Callable[[], None]:
    """Forward through :func:`fastgim.ops.norms.gated_activation` where a fused backend runs."""
    from fastgim.ops import norms

    def make_forward(m: nn.Module, original: Callable) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            scales = _active_scales()
            if scales is None or (norms.resolve_norm_backend(x.device) == "torch" and not FUSE_ON_CPU):
                return original(x)
            token = _FUSED_RUNNING.set(True)  # the branch hooks must not scale a second time
            try:
                gate, up = m.gate_proj(x), m.up_proj(x)
            finally:
                _FUSED_RUNNING.reset(token)
            hidden = norms.gated_activation(gate, up, activation=activation, gate_scale=scales[0],
                                            up_scale=scales[1])
            return m.down_proj(hidden)

        return forward

    return set_forward(module, make_forward)


def _halves_hook(_module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
    scales = _active_scales()
    return None if scales is None else scale_halves_gradient(output, *scales)


class _ExpertsLinearMode(TorchFunctionMode):
    """Scales the halves of ``F.linear(x, experts.gate_up_proj[i])`` outputs (the eager experts loop)."""

    def __init__(self, weight: torch.Tensor, scales: tuple[float, float]) -> None:
        super().__init__()
        self.weight, self.scales = weight, scales

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear and len(args) > 1 and getattr(args[1], "_base", None) is self.weight:
            out = scale_halves_gradient(out, *self.scales)
        return out


def _eager_experts(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None) in (None, "eager")


def _patch_experts(module: nn.Module) -> Callable[[], None]:
    def make_forward(m: nn.Module, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            scales = _active_scales()
            if scales is None or not _eager_experts(m):
                return original(*args, **kwargs)
            with _ExpertsLinearMode(m.gate_up_proj, scales):
                return original(*args, **kwargs)

        return forward

    undo_forward = set_forward(module, make_forward)
    if not hasattr(module, "_apply_gate"):
        return undo_forward
    had_own = "_apply_gate" in module.__dict__
    previous = module.__dict__.get("_apply_gate")
    class_apply_gate = module._apply_gate

    def apply_gate(gate_up_out: torch.Tensor) -> torch.Tensor:
        scales = _active_scales()
        if scales is not None:
            gate_up_out = scale_halves_gradient(gate_up_out, *scales)
        return class_apply_gate(gate_up_out)

    module._apply_gate = apply_gate

    def undo() -> None:
        if had_own:
            module._apply_gate = previous
        else:
            del module._apply_gate
        undo_forward()

    return undo


def patch_gated_mlps(model: nn.Module) -> Callable[[], None]:
    """Install the gate/up gradient scales on every gated MLP of ``model``; returns the undo.

    Raises ``TypeError`` naming the class before changing anything if a gated MLP is of an unknown layout.
    """
    undo: list[Callable[[], None]] = []
    try:
        for _, module, kind in find_gated_mlps(model):
            if kind == "split":
                handles = [module.gate_proj.register_forward_hook(_branch_hook(0)),
                           module.up_proj.register_forward_hook(_branch_hook(1))]
                undo.extend(h.remove for h in handles)
                activation = _activation_name(module)
                if type(module).__name__ in FUSABLE_SPLIT_MLPS and activation is not None:
                    undo.append(_patch_fused_split(module, activation))
            elif kind == "fused":
                undo.append(module.gate_up_proj.register_forward_hook(_halves_hook).remove)
            else:
                undo.append(_patch_experts(module))
    except BaseException:
        for step in reversed(undo):
            step()
        raise

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore
