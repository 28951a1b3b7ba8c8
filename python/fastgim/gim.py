"""``fastgim.GIM``: the context manager that makes a model's backward GIM's.

Inside ``with GIM(model, ...)``:

* the GIM settings are the active ones in this thread (``fastgim.settings.use_settings``),
  which the ``gim_fused`` attention op reads (temperature, Q/K/V scales);
* the model runs ``gim_fused`` attention (switched for the block if it was on another one), or, for
  models outside transformers' attention registry (any other ``nn.Module``), a thread-local
  :class:`fastgim.function_mode.GIMFunctionMode` is active for the block in the entering thread;
* every norm has a frozen-statistics forward (if ``freeze_norm``);
* every gated MLP has the gate / up gradient scales (if either scale is set).

Forward outputs are unchanged bit for bit. On exit (exceptions included, and also when
entering fails half-way) every module attribute, hook and the attention implementation
are restored exactly.

Concurrency and nesting. The patches read the settings from the context variable at
call time, so they are inert outside a GIM context. They are installed per model by
the first active context and removed by the last one (reference counted under a lock),
so several threads may run ``GIM`` on one model at once, each with its own settings.
Nesting in one thread works: the innermost context's settings are the active ones.
Nesting contexts on *different* models with *different* settings is an error, because
the settings are per thread, not per model (the inner block would silently apply its
settings to the outer model too).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import threading
import weakref
from collections.abc import Callable
from types import TracebackType

from torch import nn

from fastgim import function_mode
from fastgim.integrations import hf
from fastgim.mlp_patching import patch_gated_mlps
from fastgim.norm_patching import patch_norms
from fastgim.settings import (
    DEFAULT_GATE_SCALE,
    DEFAULT_K_SCALE,
    DEFAULT_Q_SCALE,
    DEFAULT_TEMPERATURE,
    DEFAULT_UP_SCALE,
    DEFAULT_V_SCALE,
    GIMSettings,
    use_settings,
)


@dataclasses.dataclass
class _ModelPatches:
    """The patches installed on one model and how many active GIM contexts use them."""

    users: int = 0
    path: str | None = None  # "registry" or "function_mode": one per model at a time
    undo: dict[str, Callable[[], None]] = dataclasses.field(default_factory=dict)


_LOCK = threading.RLock()
_PATCHES: weakref.WeakKeyDictionary[nn.Module, _ModelPatches] = weakref.WeakKeyDictionary()
# The models of the GIM contexts active in this thread / task, innermost last.
_ACTIVE_MODELS: contextvars.ContextVar[tuple[tuple[nn.Module, GIMSettings], ...]] = contextvars.ContextVar(
    "fastgim_gim_models", default=()
)


def _tlens_module():
    """``fastgim.integrations.tlens`` or None where this installation lacks it."""
    try:
        return importlib.import_module("fastgim.integrations.tlens")
    except ImportError:
        return None


def is_hooked_transformer(model: object) -> bool:
    """True for a TransformerLens ``HookedTransformer`` (or a model with the same hook interface)."""
    tlens = _tlens_module()
    if tlens is not None and tlens.is_tlens_model(model):
        return True
    return any(cls.__name__ == "HookedTransformer" for cls in type(model).__mro__)


INTEGRATIONS = ("auto", "registry", "function_mode")


def _install(model: nn.Module, patches: _ModelPatches, settings: GIMSettings, registry: bool) -> None:
    """Add the patch groups ``settings`` needs that are not installed yet; on error undo what this call did."""
    path = "registry" if registry else "function_mode"
    if patches.path not in (None, path):
        raise RuntimeError(
            f"GIM is already active on this {type(model).__name__} through the {patches.path} path in another "
            f"context; a concurrent context cannot use the {path} path. Use the same integration= in both."
        )
    added: list[str] = []
    try:
        if "attention" not in patches.undo:
            if registry:
                stack = contextlib.ExitStack()
                stack.enter_context(hf.use_gim_fused(model))
                patches.undo["attention"] = stack.close
            else:
                patches.undo["attention"] = function_mode.install_forward_check(model)
            added.append("attention")
        if settings.freeze_norm and "norms" not in patches.undo:
            patches.undo["norms"] = patch_norms(model) if registry else function_mode.patch_norm_modules(model)
            added.append("norms")
        wants_mlp = settings.gate_scale is not None or settings.up_scale is not None
        if wants_mlp and "mlp" not in patches.undo:
            patches.undo["mlp"] = patch_gated_mlps(model)
            added.append("mlp")
    except BaseException:
        for key in reversed(added):
            patches.undo.pop(key)()
        raise
    patches.path = path


def _uninstall(patches: _ModelPatches) -> None:
    """Undo every patch group, last installed first; every step runs even if one fails."""
    errors = []
    for key in reversed(list(patches.undo)):
        try:
            patches.undo.pop(key)()
        except Exception as error:  # noqa: BLE001 - restore as much as possible, re-raise after
            errors.append(error)
    if errors:
        raise errors[0]


class GIM:
    """Context manager applying GIM's backward rules to a PyTorch model.

    Args:
        model: a transformers model whose attention routes through ``AttentionInterface``
            (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, GPT-2, GPT-NeoX, OLMo2, BERT, MoE families, ...:
            the ``gim_fused`` registry path), a TransformerLens ``HookedTransformer`` (handled by
            ``fastgim.integrations.tlens`` when installed), or any other ``nn.Module`` whose attention calls
            ``F.scaled_dot_product_attention`` or a softmax over ``q @ k^T`` scores (StableLm, Falcon, Bloom,
            nanoGPT-style models, ...: the thread-local function mode, :mod:`fastgim.function_mode`).
        freeze_norm: treat norm statistics as constants in the backward (False / None: off).
        softmax_temperature: temperature of the softmax backward in attention (None: off).
        q_scale, k_scale, v_scale: multipliers of dQ, dK, dV (None: off).
        gate_scale, up_scale: multipliers of the gradients into the gated MLP's gate / up branches (None: off).
        softmax_scope: which softmaxes outside the attention op get the temperature backward:
            ``"attention"`` (default: softmaxes over the last dim of 4-D tensors, i.e. attention
            probabilities, not MoE routers), ``"all"`` (every softmax, as gim-explain) or a callable
            ``(tensor, dim) -> bool``.
        integration: ``"auto"`` (the registry path for models it serves, else the function mode),
            ``"registry"`` or ``"function_mode"`` to force one.

    The forward pass is unchanged bit for bit; use it with ``with GIM(model): loss.backward()``.
    Raises ``TypeError`` on entry for unsupported architectures and for norm or gated-MLP classes it
    cannot handle exactly (naming them), ``ValueError`` for invalid settings; the model is unchanged then.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        freeze_norm: bool | None = True,
        softmax_temperature: float | None = DEFAULT_TEMPERATURE,
        q_scale: float | None = DEFAULT_Q_SCALE,
        k_scale: float | None = DEFAULT_K_SCALE,
        v_scale: float | None = DEFAULT_V_SCALE,
        gate_scale: float | None = DEFAULT_GATE_SCALE,
        up_scale: float | None = DEFAULT_UP_SCALE,
        softmax_scope: function_mode.SoftmaxScope = "attention",
        integration: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GIM needs a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
        if freeze_norm not in (True, False, None):
            raise TypeError(f"freeze_norm must be True, False or None, got {freeze_norm!r}")
        if integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {', '.join(INTEGRATIONS)}, got {integration!r}")
        function_mode.check_scope(softmax_scope)
        self.model = model
        self.softmax_scope = softmax_scope
        self.integration = integration
        self.settings = GIMSettings(
            freeze_norm=bool(freeze_norm), softmax_temperature=softmax_temperature, q_scale=q_scale,
            k_scale=k_scale, v_scale=v_scale, gate_scale=gate_scale, up_scale=up_scale,
        )
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> GIM:
        if self._stack is not None:
            raise RuntimeError("this GIM context is already active; create a new GIM(...) to nest")
        stack = contextlib.ExitStack()
        try:
            if is_hooked_transformer(self.model):
                stack.enter_context(self._tlens_context())
            else:
                self._check_nesting()
                registry = self.uses_registry()
                self._acquire(registry)
                stack.callback(self._release)
                stack.enter_context(use_settings(self.settings))
                if not registry or self.softmax_scope != "attention":
                    stack.enter_context(
                        function_mode.activate(attention=not registry, softmax_scope=self.softmax_scope)
                    )
                token = _ACTIVE_MODELS.set((*_ACTIVE_MODELS.get(), (self.model, self.settings)))
                stack.callback(_ACTIVE_MODELS.reset, token)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _tlens_context(self) -> contextlib.AbstractContextManager:
        tlens = _tlens_module()
        if tlens is None:
            raise TypeError(
                "GIM on a TransformerLens HookedTransformer needs fastgim.integrations.tlens, which is not available in this "
                "installation; use the Hugging Face model instead (e.g. AutoModelForCausalLM.from_pretrained)"
            )
        return tlens.gim_context(self.model, self.settings)

    def _check_nesting(self) -> None:
        for model, settings in _ACTIVE_MODELS.get():
            if model is not self.model and settings != self.settings:
                raise RuntimeError(
                    f"a GIM context with other settings is already active on another model "
                    f"({type(model).__name__}); GIM settings are per thread, so the inner block would apply its "
                    "settings to both models. Leave the outer block first, or use the same settings."
                )

    def uses_registry(self) -> bool:
        """True if this context serves its model through the ``gim_fused`` registry path."""
        if self.integration == "auto":
            return hf.supports_gim_fused(self.model)
        return self.integration == "registry"

    def _acquire(self, registry: bool) -> None:
        with _LOCK:
            patches = _PATCHES.setdefault(self.model, _ModelPatches())
            try:
                _install(self.model, patches, self.settings, registry)
            except BaseException:
                if patches.users == 0:
                    _PATCHES.pop(self.model, None)
                raise
            patches.users += 1

    def _release(self) -> None:
        with _LOCK:
            patches = _PATCHES.get(self.model)
            if patches is None:
                return
            patches.users -= 1
            if patches.users == 0:
                del _PATCHES[self.model]
                _uninstall(patches)
