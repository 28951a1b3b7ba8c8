"""Every ```python block of README.md runs as written (bundled model, offline).

A block may start with ``# needs: pkg-a, pkg-b`` (distribution names): it is skipped, with that reason,
only when one of them is not installed. No other block is ever skipped.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import linecache
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_NEEDS = re.compile(r"^# needs: (.+)$", re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of each ```python block of a Markdown text."""
    return [(text.count("\n", 0, match.start()) + 1, match.group(1)) for match in _BLOCK.finditer(text)]


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def _missing(code: str) -> list[str]:
    needs = _NEEDS.match(code)
    names = [name.strip() for name in needs.group(1).split(",")] if needs else []
    missing = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def test_the_readme_has_its_blocks() -> None:
    assert len(BLOCKS) >= 4, "README.md lost its Python examples (or this test's pattern no longer finds them)"
    assert python_blocks("text\n```python\nx = 1\n```\n") == [(2, "x = 1\n")]


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line: int, code: str) -> None:
    missing = _missing(code)
    if missing:
        pytest.skip(f"README.md:{line} needs {', '.join(missing)} (marked '# needs:' in the block)")
    namespace = {"__name__": f"readme_line_{line}"}
    filename = f"README.md:{line}"
    # Tools that read their caller's source back (nnsight's trace blocks) find it through linecache.
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # an exception fails the test, with README.md:<line> in it
            exec(compile(code, filename, "exec"), namespace)
    finally:
        linecache.cache.pop(filename, None)
