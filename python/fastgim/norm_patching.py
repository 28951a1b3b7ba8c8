"""Finding the norms in a model and giving them frozen-statistics forwards (GIM rule 1).

Every LayerNorm / RMSNorm in a model (the model norms, the per-layer norms and the
q_norm / k_norm inside attention) is described by a :class:`NormSpec`: which op
computes it (``rms_norm`` or ``layer_norm`` from :mod:`fastgim.ops.norms`), how the
model casts (``"llama"``: ``w * x.to(dtype)``; ``"gemma"``: ``(x * (1 + w)).to(dtype)``;
``"olmo2"``: ``(w * x).to(dtype)``), the weight offset (1 for Gemma's ``1 + w``) and
where eps lives. Known classes come from a registry; other classes whose name says
they are a norm are matched by duck typing. In both cases the spec is confirmed by a
probe (the class's own forward and the op must agree bit for bit in the weights'
dtype and in bfloat16) before anything is patched; a norm class that no spec
reproduces is an error naming it, never a silent skip.

Patching sets ``module.forward`` as an instance attribute and deletes it again on
restore; classes are never changed. The patched forward reads the GIM settings from
the context variable at call time, so it is the original forward whenever no GIM
context with ``freeze_norm`` is active in the calling thread.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import torch
from torch import nn

from fastgim.settings import current_settings

_RMS_CASTS = ("llama", "gemma", "olmo2")
_LAYER_CASTS = ("torch", "fp32", "cohere")


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How a norm class computes its output.

    ``kind`` is ``"rms"`` or ``"layer"``; ``cast`` is the op's casting order (RMS: ``"llama"``,
    ``"gemma"``, ``"olmo2"``; LayerNorm: ``"torch"``, ``"fp32"``, ``"cohere"``); ``weight_offset`` applies
    to RMS norms; ``eps_attr`` names the module attribute holding epsilon.
    """

    kind: str
    cast: str = "llama"
    weight_offset: float = 0.0
    eps_attr: str = "eps"


_LLAMA = NormSpec("rms", "llama", 0.0, "variance_epsilon")
_GEMMA = NormSpec("rms", "gemma", 1.0, "eps")
_OLMO2 = NormSpec("rms", "olmo2", 0.0, "variance_epsilon")
_LAYER = NormSpec("layer", "torch", eps_attr="eps")

#: Known norm classes by name. Each is still confirmed by a probe before use.
KNOWN_NORMS: dict[str, NormSpec] = {
    **{
        name: _LLAMA
        for name in (
            "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
            "Qwen3MoeRMSNorm", "Phi3RMSNorm", "OlmoeRMSNorm", "GraniteRMSNorm",
        )
    },
    **{name: _GEMMA for name in ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")},
    "Olmo2RMSNorm": _OLMO2,
    "Olmo3RMSNorm": _OLMO2,
    "LayerNorm": _LAYER,
}

_PROBE_CACHE: dict[type, NormSpec | None] = {}
_PROBE_LOCK = threading.Lock()


def _norm_ops():
    from fastgim.ops import norms

    return norms


def _eps(module: nn.Module, spec: NormSpec) -> float:
    eps = getattr(module, spec.eps_attr)
    if eps is None:  # torch.nn.RMSNorm(eps=None) uses the dtype's machine epsilon
        return float(torch.finfo(module.weight.dtype).eps)
    return float(eps)


def _apply(
    module: nn.Module, spec: NormSpec, x: torch.Tensor, *, frozen: bool, backend: str | None = None
) -> torch.Tensor:
    """The norm's output through :mod:`fastgim.ops.norms` (frozen statistics if ``frozen``)."""
    ops = _norm_ops()
    weight = getattr(module, "weight", None)
    eps = _eps(module, spec)
    if spec.kind == "layer":
        bias = getattr(module, "bias", None)
        return ops.layer_norm(x, weight, bias, eps, cast=spec.cast, frozen=frozen, backend=backend)
    return ops.rms_norm(x, weight, eps, weight_offset=spec.weight_offset, cast=spec.cast, frozen=frozen,
                        backend=backend)


def is_norm_candidate(module: nn.Module) -> bool:
    """True if ``module`` is a norm GIM must freeze: torch's LayerNorm / RMSNorm or a class named ``*Norm``."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    return name.endswith("Norm") and "Group" not in name and "Batch" not in name


def _candidate_specs(module: nn.Module) -> list[NormSpec]:
    known = KNOWN_NORMS.get(type(module).__name__)
    if isinstance(module, nn.LayerNorm):
        return [_LAYER]
    if isinstance(module, nn.RMSNorm):  # multiplies the weight in fp32, like OLMo2
        return [NormSpec("rms", "olmo2", 0.0, "eps")]
    specs = [known] if known is not None else []
    eps_attrs = [a for a in ("variance_epsilon", "eps", "epsilon") if isinstance(getattr(module, a, None), float)]
    if "LayerNorm" in type(module).__name__ or "RMS" not in type(module).__name__:
        specs += [NormSpec("layer", cast, eps_attr=a) for cast in _LAYER_CASTS for a in eps_attrs]
    for cast in _RMS_CASTS:
        for offset in (0.0, 1.0):
            specs += [NormSpec("rms", cast, offset, a) for a in eps_attrs]
    return list(dict.fromkeys(specs))


def _hidden_size(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0] if weight.dim() == 1 else None
    shape = getattr(module, "normalized_shape", None)
    return shape[-1] if isinstance(shape, (tuple, list)) and len(shape) == 1 else None


def _agrees(module: nn.Module, spec: NormSpec, dtypes: tuple[torch.dtype, ...]) -> bool:
    hidden = _hidden_size(module)
    if hidden is None:
        return False
    generator = torch.Generator().manual_seed(0)
    forward = type(module).forward
    device = next(module.parameters(), torch.empty(0)).device
    compared = 0
    for dtype in dtypes:
        x = (torch.randn(3, hidden, generator=generator) * 3 + 0.5).to(device, dtype)
        with torch.no_grad():
            try:
                expected = forward(module, x)
            except (RuntimeError, TypeError, ValueError):
                continue  # the module itself does not take this dtype: nothing to match
            try:
                # The exact torch path: fused GPU kernels may differ from the module by one ulp.
                got = _apply(module, spec, x, frozen=False, backend="torch")
            except ValueError:
                continue  # the op refuses this mix of dtypes (e.g. bf16 input, fp32 LayerNorm weight)
            except (RuntimeError, TypeError, AttributeError):
                return False
        if not (isinstance(expected, torch.Tensor) and expected.dtype == got.dtype and torch.equal(expected, got)):
            return False
        compared += 1
    return compared > 0


def norm_spec(module: nn.Module) -> NormSpec:
    """The spec reproducing ``module``'s forward bit for bit; ``TypeError`` naming the class if none does."""
    cls = type(module)
    with _PROBE_LOCK:
        if cls in _PROBE_CACHE:
            spec = _PROBE_CACHE[cls]
        else:
            weight = getattr(module, "weight", None)
            first = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
            dtypes = tuple(dict.fromkeys((first, torch.bfloat16)))
            spec = next((s for s in _candidate_specs(module) if _agrees(module, s, dtypes)), None)
            _PROBE_CACHE[cls] = spec
    if spec is None:
        raise TypeError(
            f"GIM cannot freeze the norm class {cls.__module__}.{cls.__name__}: it is not a known norm and no "
            "RMSNorm/LayerNorm variant reproduces its forward exactly. Pass freeze_norm=False to skip the "
            "frozen-norm rule, or add a NormSpec for it to fastgim.norm_patching.KNOWN_NORMS."
        )
    return spec


def find_norms(
    model: nn.Module, skip: Callable[[nn.Module], bool] | None = None
) -> list[tuple[str, nn.Module, NormSpec]]:
    """Every norm in ``model`` as ``(qualified name, module, spec)``; raises for an unknown norm class.

    ``skip(module)`` True leaves a norm out (handled elsewhere, e.g. by :mod:`fastgim.function_mode`).
    """
    return [
        (name, module, norm_spec(module)) for name, module in model.named_modules()
        if is_norm_candidate(module) and not (skip is not None and skip(module))
    ]


def _frozen_forward(module: nn.Module, spec: NormSpec, original: Callable) -> Callable:
    def forward(*args, **kwargs):
        settings = current_settings()
        if settings is None or not settings.freeze_norm or len(args) != 1 or kwargs:
            return original(*args, **kwargs)
        return _apply(module, spec, args[0], frozen=True)

    forward.__fastgim_patch__ = True
    return forward


def patch_norms(model: nn.Module, skip: Callable[[nn.Module], bool] | None = None) -> Callable[[], None]:
    """Give every norm in ``model`` a frozen-statistics forward; returns the function that undoes it.

    Nothing is changed if a norm class is unknown (the error is raised before any patch). ``skip`` as in
    :func:`find_norms`.
    """
    found = find_norms(model, skip)
    undo: list[Callable[[], None]] = []
    for _, module, spec in found:
        undo.append(set_forward(module, lambda m, original, s=spec: _frozen_forward(m, s, original)))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def set_forward(module: nn.Module, make: Callable[[nn.Module, Callable], Callable]) -> Callable[[], None]:
    """Set the module's forward to ``make(module, current forward)``; returns the undo.

    Under accelerate's hooks (``device_map`` with offloading) ``module.forward`` is the hook's
    wrapper, which loads the weights and then calls ``module._old_forward``; the patch then goes
    on ``_old_forward`` so the weights are still loaded first.
    """
    name = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
    had_own = name in module.__dict__
    previous = module.__dict__.get(name)
    setattr(module, name, make(module, getattr(module, name)))

    def undo() -> None:
        if had_own:
            setattr(module, name, previous)
        else:
            delattr(module, name)

    return undo
