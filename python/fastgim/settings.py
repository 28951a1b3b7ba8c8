"""GIM settings and the context variable that carries them to the attention op.

The attention op reads the active settings when its forward runs and the autograd
node keeps them, so the backward uses the settings that were active at forward
time even if the context has been left since. Context variables are per thread
(and per asyncio task), so two threads with different settings never mix.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

from fastgim.validation import finite_number

DEFAULT_TEMPERATURE = 2.0
DEFAULT_Q_SCALE = 0.25
DEFAULT_K_SCALE = 0.25
DEFAULT_V_SCALE = 0.5
DEFAULT_GATE_SCALE = 0.5
DEFAULT_UP_SCALE = 0.5


@dataclasses.dataclass(frozen=True)
class AttentionGIM:
    """The GIM rules that act inside the attention op.

    ``temperature`` is the softmax temperature used in the backward only (1 = the
    ordinary softmax backward); the scales multiply dQ, dK and dV (1 = unchanged).
    """

    temperature: float = 1.0
    q_scale: float = 1.0
    k_scale: float = 1.0
    v_scale: float = 1.0

    @property
    def is_plain(self) -> bool:
        return self.temperature == 1.0 and self.q_scale == 1.0 and self.k_scale == 1.0 and self.v_scale == 1.0


PLAIN = AttentionGIM()


@dataclasses.dataclass(frozen=True)
class GIMSettings:
    """All GIM rules. ``None`` (or ``False`` for ``freeze_norm``) turns a rule off."""

    freeze_norm: bool = True
    softmax_temperature: float | None = DEFAULT_TEMPERATURE
    q_scale: float | None = DEFAULT_Q_SCALE
    k_scale: float | None = DEFAULT_K_SCALE
    v_scale: float | None = DEFAULT_V_SCALE
    gate_scale: float | None = DEFAULT_GATE_SCALE
    up_scale: float | None = DEFAULT_UP_SCALE

    def __post_init__(self) -> None:
        if self.softmax_temperature is not None:
            finite_number(self.softmax_temperature, "softmax_temperature", positive=True)
        for name in ("q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"):
            value = getattr(self, name)
            if value is not None:
                finite_number(value, name)

    @classmethod
    def off(cls) -> GIMSettings:
        """Settings with every rule turned off: the ordinary gradient."""
        return cls(False, None, None, None, None, None, None)

    @property
    def attention(self) -> AttentionGIM:
        return AttentionGIM(
            temperature=_or_one(self.softmax_temperature),
            q_scale=_or_one(self.q_scale),
            k_scale=_or_one(self.k_scale),
            v_scale=_or_one(self.v_scale),
        )


def _or_one(value: float | None) -> float:
    return 1.0 if value is None else float(value)


_ACTIVE: contextvars.ContextVar[GIMSettings | None] = contextvars.ContextVar("fastgim_gim_settings", default=None)


def current_settings() -> GIMSettings | None:
    """The GIM settings active in this thread / task, or None outside a GIM context."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_settings(settings: GIMSettings | None) -> Iterator[GIMSettings | None]:
    """Make ``settings`` the active GIM settings for the enclosed block."""
    token = _ACTIVE.set(settings)
    try:
        yield settings
    finally:
        _ACTIVE.reset(token)
