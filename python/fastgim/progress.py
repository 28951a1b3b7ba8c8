"""Progress bars that stay out of logs: shown on a terminal, and only for runs that take a while.

``enabled=None`` (the default everywhere in fastgim) means: a bar on stderr only when stderr is a
terminal, appearing after :data:`DELAY_S` seconds, so short runs print nothing and output captured
in a file or a pipe holds no ``\\r``-refreshed bar lines. ``True`` forces the bar, ``False`` hides it.
"""

from __future__ import annotations

import sys
from typing import Any

DELAY_S = 1.0  # a bar appears only once the run has lasted this long


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` (where bars go) is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable: Any = None, *, total: int | None = None, desc: str = "", enabled: bool | None = None,
                 leave: bool = False) -> Any:
    """A ``tqdm`` bar over ``iterable`` / ``total`` steps, on stderr; see the module docstring for ``enabled``."""
    from tqdm.auto import tqdm

    auto = enabled is None
    show = stderr_is_terminal() if auto else bool(enabled)
    return tqdm(iterable, total=total, desc=desc, disable=not show, delay=DELAY_S if auto else 0.0,
                leave=leave, file=sys.stderr)
