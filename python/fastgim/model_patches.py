"""Patches shared by every concurrent user of one model, installed once and reference counted.

Several threads (or nested blocks in one thread) may attribute with one model at the same time.
Anything that changes the model (hooks, forwards set on instances, parameter flags) must then be
installed by the first user and undone by the last one; the patch itself reads the per-call
state from a context variable, so it is inert in every call that did not ask for it (plain
inference in another thread included). :func:`shared_patch` is that protocol:

    with shared_patch(model, "my_hooks", install):
        ...

``install()`` changes the model and returns the function that undoes the change; it runs under
a lock the first time ``(model, key)`` is entered, and the undo runs when the last block using
``(model, key)`` exits (exceptions included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator

from torch import nn

Undo = Callable[[], None]


@dataclasses.dataclass
class _Installed:
    undo: Undo
    users: int = 0


_LOCK = threading.RLock()
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, dict[str, _Installed]] = weakref.WeakKeyDictionary()


def acquire(model: nn.Module, key: str, install: Callable[[], Undo]) -> None:
    """Count one more user of patch ``key`` on ``model``, installing it if this is the first."""
    with _LOCK:
        patches = _INSTALLED.setdefault(model, {})
        if key not in patches:
            try:
                patches[key] = _Installed(install())
            except BaseException:
                if not patches:
                    _INSTALLED.pop(model, None)
                raise
        patches[key].users += 1


def release(model: nn.Module, key: str) -> None:
    """Count one user less of patch ``key`` on ``model``; the last one undoes the patch."""
    with _LOCK:
        patches = _INSTALLED.get(model, {})
        installed = patches.get(key)
        if installed is None:
            return
        installed.users -= 1
        if installed.users > 0:
            return
        del patches[key]
        if not patches:
            _INSTALLED.pop(model, None)
        installed.undo()


def users(model: nn.Module, key: str) -> int:
    """How many blocks use patch ``key`` on ``model`` now (0 when it is not installed)."""
    with _LOCK:
        installed = _INSTALLED.get(model, {}).get(key)
        return 0 if installed is None else installed.users


@contextlib.contextmanager
def shared_patch(model: nn.Module, key: str, install: Callable[[], Undo]) -> Iterator[None]:
    """Hold patch ``key`` on ``model`` for the block (installed by the first user, undone by the last)."""
    acquire(model, key, install)
    try:
        yield
    finally:
        release(model, key)
