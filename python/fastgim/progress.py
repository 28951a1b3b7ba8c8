"""Progress bars that stay out of logs: shown on a terminal, and only for runs that take a while.

``enabled=None`` (the default everywhere in fastgim) means: a bar only when stderr is a terminal
(or in a Jupyter kernel, where tqdm draws a widget), appearing after :data:`DELAY_S` seconds, so
short runs print nothing and output captured in a file or a pipe holds no ``\\r``-refreshed bar
lines. ``True`` forces the bar, ``False`` hides it.
"""

from __future__ import annotations

import sys
from typing import Any

DELAY_S = 1.0  # a bar appears only once the run has lasted this long


def interactive() -> bool:
    """Whether a person watches the bars: ``sys.stderr`` is a terminal, or this is a Jupyter kernel."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        if isatty and isatty():
            return True
    except ValueError:  # a closed stream
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")


def progress_bar(iterable: Any = None, *, total: int | None = None, desc: str = "", enabled: bool | None = None,
                 leave: bool = False) -> Any:
    """A ``tqdm`` bar over ``iterable`` / ``total`` steps, on stderr; see the module docstring for ``enabled``."""
    from tqdm.auto import tqdm

    auto = enabled is None
    show = interactive() if auto else bool(enabled)
    return tqdm(iterable, total=total, desc=desc, disable=not show, delay=DELAY_S if auto else 0.0,
                leave=leave, file=sys.stderr)
