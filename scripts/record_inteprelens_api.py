"""Record inteprelens 0.2.1's public API (every module, name and signature) for tests/test_inteprelens_api.py.

Run ONCE in a separate environment holding the real inteprelens (not fastgim's)::

    python -m venv /tmp/ilens && /tmp/ilens/bin/pip install torch==2.13.0 inteprelens==0.2.1
    /tmp/ilens/bin/python scripts/record_inteprelens_api.py tests/fixtures/inteprelens_0_2_1_api.json

For each module of the package it records the public names that are inteprelens' own objects (classes,
functions and constants defined in the package, including those a module re-exports), not the
third-party names a module happens to import (``torch``, ``LinearLR``, ``trange``, typing helpers). For
each callable: its parameters as ``[name, kind, repr(default) or ""]``; for each class, the same for
every public member (``"property"`` for properties, ``"attribute"`` for other class attributes).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import pkgutil
import sys
import typing

PACKAGE = "inteprelens"


def parameters(obj) -> list[list[str]] | str:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return "no signature"
    return [[p.name, p.kind.name, "" if p.default is inspect.Parameter.empty else repr(p.default)]
            for p in signature.parameters.values()]


def is_own(obj) -> bool:
    """A class or function defined in the package, or a constant / type alias (not a third-party import)."""
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return getattr(obj, "__module__", "").startswith(PACKAGE)
    if obj is typing.Literal or isinstance(obj, typing.TypeVar):
        return False
    if isinstance(obj, typing._GenericAlias) or type(obj).__module__ in ("typing", "collections.abc"):
        return True
    return not callable(obj) and not inspect.ismodule(obj) and type(obj).__module__ == "builtins"


def class_members(cls: type) -> dict[str, object]:
    members = {}
    for name in dir(cls):
        if (name.startswith("_") and name != "__init__") or hasattr(object, name) and name != "__init__":
            continue
        static = inspect.getattr_static(cls, name)
        if isinstance(static, property):
            members[name] = "property"
        elif callable(static) or isinstance(static, (classmethod, staticmethod)):
            members[name] = parameters(getattr(cls, name))
        else:
            members[name] = "attribute"
    return members


def describe(obj) -> dict[str, object]:
    if inspect.isclass(obj):
        return {"kind": "class", "parameters": parameters(obj), "members": class_members(obj)}
    if isinstance(obj, dict) and obj and all(inspect.isclass(v) for v in obj.values()):
        return {"kind": "registry", "value": {key: cls.__name__ for key, cls in obj.items()}}
    if isinstance(obj, dict):
        return {"kind": "mapping", "value": {key: repr(value) for key, value in obj.items()}}
    if typing.get_origin(obj) is typing.Literal:
        return {"kind": "literal", "value": list(typing.get_args(obj))}
    if typing.get_origin(obj) is not None:
        return {"kind": "alias", "value": repr(obj)}
    if callable(obj):
        return {"kind": "function", "parameters": parameters(obj)}
    if isinstance(obj, (str, int, float, tuple, list, frozenset, set)):
        return {"kind": "constant", "value": repr(obj)}
    return {"kind": "alias", "value": repr(obj)}


def qualified_name(obj) -> str:
    return f"{obj.__module__.removeprefix(PACKAGE).lstrip('.')}:{obj.__qualname__}"


def main(out_path: str) -> None:
    """``modules``: module path -> {``__all__``, ``names``: name -> object key}; ``objects``: key -> description.

    A class or function is described once, under ``module:qualname`` of its definition; a constant or
    type alias under ``module:name`` of the module it is first seen in.
    """
    package = importlib.import_module(PACKAGE)
    modules = [PACKAGE] + sorted(m.name for m in pkgutil.walk_packages(package.__path__, PACKAGE + "."))
    objects: dict[str, dict[str, object]] = {}
    record: dict[str, dict[str, object]] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        path = module_name.removeprefix(PACKAGE).lstrip(".")
        names = {}
        for name, obj in vars(module).items():
            if name.startswith("_") or inspect.ismodule(obj) or not is_own(obj):
                continue
            key = qualified_name(obj) if inspect.isclass(obj) or inspect.isfunction(obj) else f"{path}:{name}"
            objects.setdefault(key, describe(obj))
            names[name] = key
        record[path] = {"__all__": list(getattr(module, "__all__", [])), "names": names}
    with open(out_path, "w") as handle:
        json.dump({"package": PACKAGE, "version": importlib.metadata.version(PACKAGE), "modules": record,
                   "objects": objects}, handle, indent=0, sort_keys=True)
        handle.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
