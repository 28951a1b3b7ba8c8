"""Every public name of inteprelens 0.2.1, in every module, exists in ``fastgim.inteprelens`` with its signature.

The reference is inteprelens' API recorded ONCE from the real package by
``scripts/record_inteprelens_api.py`` (``tests/fixtures/inteprelens_0_2_1_api.json``): each module's
public names that are inteprelens' own objects, each callable's parameters ``[name, kind, default]`` and
each class's public members. A fastgim signature is compatible when every inteprelens parameter exists
with the same kind and default, inteprelens' positional parameters keep their order, and every parameter
fastgim adds is optional. The few deliberate extensions are listed below with their reason; the
behaviour behind the names is checked against recorded values in the other ``test_inteprelens_*`` files.
"""

from __future__ import annotations

import importlib
import inspect
import json
import typing
from pathlib import Path

import pytest

import fastgim

RECORD = json.loads((Path(__file__).parent / "fixtures" / "inteprelens_0_2_1_api.json").read_text())
MODULES = RECORD["modules"]
OBJECTS = RECORD["objects"]

# Signatures that accept every inteprelens call but differ in a recorded detail, with the reason.
EXTENSIONS = {
    "LensAPI.from_pretrained": "model_name_or_path=None loads fastgim's bundled model",
    "TransformerTracer.trace": "texts, ids or an encoding first; input_ids= works as in inteprelens",
    "TransformerTracer.__init__": "TransformerTracer(model, tokenizer, adapter); an adapter given second is adapter=",
    "TransformerTracer": "TransformerTracer(model, tokenizer, adapter); an adapter given second is adapter=",
    "CHGResults.necessary_heads": "threshold=None: the results' own threshold, 0.5 unless set",
    "CHGResults.sufficient_heads": "threshold=None: the results' own threshold, 0.5 unless set",
    "CHGResults.head_taxonomy": "threshold=None: the results' own threshold, 0.5 unless set",
    "CHGResults.get_facilitating_mask": "threshold=None: the results' own threshold, 0.5 unless set",
    "CHGResults.summary": "threshold=None: the results' own threshold, 0.5 unless set",
}
# Constructors that take different arguments: the class is used through its other members.
OTHER_CONSTRUCTORS = {
    "CHGDataset": "fastgim's CHGDataset is the dataset; inteprelens' is a namespace of static constructors",
    "CHGDataset.__init__": "fastgim's CHGDataset is the dataset; inteprelens' is a namespace of static constructors",
}
# inteprelens properties that fastgim sets on the instance in __init__ (checked on real instances below).
INSTANCE_ATTRIBUTES = {"CHG": {"num_heads", "num_layers"}, "LensAPI": {"num_heads", "num_layers"}}


def mirror(path: str):
    return importlib.import_module("fastgim.inteprelens" + (f".{path}" if path else ""))


def parameters(obj) -> list[list[str]]:
    return [[p.name, p.kind.name, "" if p.default is inspect.Parameter.empty else repr(p.default)]
            for p in inspect.signature(obj).parameters.values()]


def incompatibilities(wanted: list[list[str]], got: list[list[str]]) -> list[str]:
    by_name = {entry[0]: entry for entry in got}
    problems = [f"{w} is {by_name.get(w[0])}" for w in wanted
                if by_name.get(w[0]) != w and not (w[1] == "VAR_KEYWORD" and any(g[1] == w[1] for g in got))]
    positional = [w[0] for w in wanted if w[1] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    if [g[0] for g in got][: len(positional)] != positional:
        problems.append(f"positional order {positional} vs {[g[0] for g in got]}")
    names = {w[0] for w in wanted}
    problems += [f"new required parameter {g[0]}" for g in got
                 if g[2] == "" and g[0] not in names and g[1] not in ("VAR_POSITIONAL", "VAR_KEYWORD")]
    return problems


NAMES = sorted((path, name) for path, module in MODULES.items() for name in module["names"])
CALLABLES = sorted({(key.partition(":")[2], key) for key, entry in OBJECTS.items()
                    if "parameters" in entry and key.partition(":")[2] not in OTHER_CONSTRUCTORS})
MEMBERS = sorted((key.partition(":")[2], member, key) for key, entry in OBJECTS.items()
                 for member in entry.get("members", {}))


def resolve(key: str):
    """The fastgim object standing for inteprelens' ``module:qualname``: the mirror module's attribute."""
    path, _, qualname = key.partition(":")
    owner = mirror(path)
    for part in qualname.split("."):
        owner = getattr(owner, part)
    return owner


@pytest.mark.parametrize(("path", "name"), NAMES, ids=[f"{p or 'inteprelens'}.{n}" for p, n in NAMES])
def test_every_name_exists_at_its_module_path(path: str, name: str):
    module = mirror(path)
    assert hasattr(module, name), f"fastgim.inteprelens{'.' + path if path else ''} lacks {name}"
    entry = OBJECTS[MODULES[path]["names"][name]]
    value = getattr(module, name)
    if entry["kind"] == "constant":
        assert repr(value) == entry["value"], (name, value)
    elif entry["kind"] == "registry":  # the same keys, mapped to fastgim's classes of the same names
        assert {key: cls.__name__ for key, cls in value.items()} == entry["value"], name
    elif entry["kind"] == "mapping":  # inteprelens' entries unchanged; fastgim may add its own
        assert {key: repr(value[key]) for key in entry["value"] if key in value} == entry["value"], name
    elif entry["kind"] == "literal":  # the same values allowed (fastgim may allow more)
        assert typing.get_origin(value) is typing.Literal, name
        assert set(entry["value"]) <= set(typing.get_args(value)), name
    else:
        assert entry["kind"] != "alias" or typing.get_origin(value) is not None, name


@pytest.mark.parametrize("path", sorted(MODULES))
def test_star_import_and_all(path: str):
    """``__all__`` lists inteprelens' names that exist (its utils lists two it never defines)."""
    module = mirror(path)
    wanted = [name for name in MODULES[path]["__all__"] if name in MODULES[path]["names"]]
    assert set(wanted) <= set(getattr(module, "__all__", [])), set(wanted) - set(getattr(module, "__all__", []))
    namespace: dict = {}
    exec(f"from {module.__name__} import *", namespace)


@pytest.mark.parametrize(("qualname", "key"), CALLABLES, ids=[c[0] for c in CALLABLES])
def test_callables_accept_every_inteprelens_call(qualname: str, key: str):
    got = parameters(resolve(key))
    problems = incompatibilities(OBJECTS[key]["parameters"], got)
    if qualname in EXTENSIONS:
        problems = [p for p in problems if p.startswith("new required")]
    assert not problems, f"{qualname}: {problems}"


@pytest.mark.parametrize(("owner", "member", "key"), MEMBERS, ids=[f"{o}.{m}" for o, m, _ in MEMBERS])
def test_class_members_exist_with_compatible_signatures(owner: str, member: str, key: str):
    cls = resolve(key)
    wanted = OBJECTS[key]["members"][member]
    if member in INSTANCE_ATTRIBUTES.get(owner, ()):
        return  # checked on an instance in test_instance_attributes
    assert hasattr(cls, member), f"{owner}.{member} is missing"
    if isinstance(wanted, list) and f"{owner}.{member}" not in OTHER_CONSTRUCTORS:
        problems = incompatibilities(wanted, parameters(getattr(cls, member)))
        if f"{owner}.{member}" in EXTENSIONS:
            problems = [p for p in problems if p.startswith("new required")]
        assert not problems, f"{owner}.{member}: {problems}"


def test_instance_attributes():
    analyzer = fastgim.LensAPI.from_pretrained()
    chg = fastgim.CHG(analyzer.model)
    for owner, instance in (("CHG", chg), ("LensAPI", analyzer)):
        for name in INSTANCE_ATTRIBUTES[owner]:
            assert isinstance(getattr(instance, name), int), (owner, name)
    assert (chg.num_layers, chg.num_heads) == (analyzer.num_layers, analyzer.num_heads) == (4, 4)
