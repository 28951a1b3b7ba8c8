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
    ``"gemma"``, ``"olmo2"``; LayerNorm: ``"torch"``, ``"fp32"``, ``"cohere"``); ``weight_offset`` is
    added to the weight (``1 + w`` norms; for LayerNorm in the weight's dtype, as ``self.weight + 1``);
    ``eps_attr`` names the module attribute holding epsilon, or ``eps_value`` gives a hard-coded one.
    """

    kind: str
    cast: str = "llama"
    weight_offset: float = 0.0
    eps_attr: str = "eps"
    eps_value: float | None = None


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

_PROBE_CACHE: dict[tuple[type, torch.dtype], NormSpec | None] = {}
_PROBE_LOCK = threading.Lock()


def _norm_ops():
    from fastgim.ops import norms

    return norms


def _eps(module: nn.Module, spec: NormSpec) -> float:
    if spec.eps_value is not None:
        return spec.eps_value
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
        if spec.weight_offset:
            weight = weight + spec.weight_offset
        return ops.layer_norm(x, weight, bias, eps, cast=spec.cast, frozen=frozen, backend=backend)
    return ops.rms_norm(x, weight, eps, weight_offset=spec.weight_offset, cast=spec.cast, frozen=frozen,
                        backend=backend)


def is_norm_candidate(module: nn.Module) -> bool:
    """True if ``module`` is a norm GIM must freeze: torch's LayerNorm / RMSNorm or a class named ``*Norm``."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    return name.endswith("Norm") and "Group" not in name and "Batch" not in name


#: Epsilons tried for norms that keep theirs in the code, not in an attribute (OLMo's ``eps=1e-5``).
HARD_CODED_EPS = (1e-5, 1e-6, 1e-12, 1e-8)


def _own_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    return type(module).forward is not base.forward


def _eps_choices(module: nn.Module) -> list[tuple[str, float | None]]:
    attrs = [(a, None) for a in ("variance_epsilon", "eps", "epsilon") if isinstance(getattr(module, a, None), float)]
    return attrs or [("", value) for value in HARD_CODED_EPS]


def _candidate_specs(module: nn.Module) -> list[NormSpec]:
    """Specs to probe, most likely first: torch's own classes, the registry, then every variant.

    Subclasses of ``nn.LayerNorm`` / ``nn.RMSNorm`` that override ``forward`` (an fp32 LayerNorm, ``weight + 1``)
    are probed against every variant, like classes recognised by name.
    """
    if isinstance(module, nn.LayerNorm) and not _own_forward(module, nn.LayerNorm):
        return [_LAYER]
    if isinstance(module, nn.RMSNorm) and not _own_forward(module, nn.RMSNorm):  # weight in fp32, like OLMo2
        return [NormSpec("rms", "olmo2", 0.0, "eps")]
    known = KNOWN_NORMS.get(type(module).__name__)
    specs = [known] if known is not None else []
    offsets = (0.0, 1.0) if isinstance(getattr(module, "weight", None), torch.Tensor) else (0.0,)
    eps_choices = _eps_choices(module)
    name = type(module).__name__
    if "LayerNorm" in name or "RMS" not in name or isinstance(module, nn.LayerNorm):
        specs += [NormSpec("layer", cast, offset, attr, value)
                  for cast in _LAYER_CASTS for offset in offsets for attr, value in eps_choices]
    specs += [NormSpec("rms", cast, offset, attr, value)
              for cast in _RMS_CASTS for offset in offsets for attr, value in eps_choices]
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
    # Large inputs, and small ones whose variance is near eps (so that a wrong eps shows).
    for dtype, scale in ((dtype, scale) for dtype in dtypes for scale in (3.0, 1e-3)):
        x = (torch.randn(3, hidden, generator=generator) * scale + scale / 6).to(device, dtype)
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
    weight = getattr(module, "weight", None)
    first = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    key = (cls, first)  # a class may cast differently with fp32 and with bf16 weights: probe each
    with _PROBE_LOCK:
        if key in _PROBE_CACHE:
            spec = _PROBE_CACHE[key]
        else:
            dtypes = tuple(dict.fromkeys((first, torch.bfloat16)))
            spec = next((s for s in _candidate_specs(module) if _agrees(module, s, dtypes)), None)
            _PROBE_CACHE[key] = spec
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
