"""scripts/setup_env.sh: installs from constraints.txt, and only when what decides the install changed.

The script runs in a scratch copy of the repository whose ``.venv`` has a fake ``python``: it records every
``python -m pip ...`` call instead of installing, and runs anything else with the real interpreter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "pip ${{*:3}}" >> "$PIP_LOG"
  exit 0
fi
exec {python} "$@"
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "setup.py", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup_env.sh", tmp_path / "scripts" / "setup_env.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return tmp_path


def _setup(repo: Path, *args: str, extras: str = "") -> list[str]:
    """Run setup_env.sh in ``repo``; the pip calls it made."""
    log = repo / "pip.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PIP_LOG": str(log), "FASTGIM_EXTRAS": extras}
    subprocess.run(["bash", "scripts/setup_env.sh", *args], cwd=repo, env=env, check=True, timeout=120)
    return log.read_text().splitlines() if log.exists() else []


def test_installs_from_the_constraints_and_only_when_something_changed(repo: Path) -> None:
    first = _setup(repo, extras="tlens")
    assert first == [
        "pip install -q -c .venv/fastgim-constraints.txt torch==2.13.0",
        "pip install -q --no-warn-conflicts -c .venv/fastgim-constraints.txt -e .[test,tlens]",
        "pip install -q --no-warn-conflicts -c .venv/fastgim-constraints.txt --no-deps inseq",
    ]
    pins = [p for p in (repo / ".venv" / "fastgim-constraints.txt").read_text().splitlines() if not p.startswith("#")]
    assert any(p.startswith("transformers==") for p in pins)
    assert pins.count("torch==2.13.0") == 1 and all("+cpu" not in p for p in pins)
    assert _setup(repo, extras="tlens") == []  # nothing changed: no pip at all
    assert _setup(repo) == []  # fewer extras than installed (explain.sh after test.sh)
    with open(repo / "constraints.txt", "a") as handle:
        handle.write("tqdm==4.67.1\n")
    assert len(_setup(repo)) == 3  # the constraints changed: install again
    assert _setup(repo) == []
    assert len(_setup(repo, extras="tlens")) == 3  # an extra not installed yet


def test_latest_ignores_the_constraints_and_always_upgrades(repo: Path) -> None:
    shutil.copytree(repo / ".venv", repo / ".venv-latest")
    calls = _setup(repo, "--latest")
    assert calls[-2] == (
        "pip install -q --no-warn-conflicts -c .venv-latest/fastgim-constraints.txt --upgrade --upgrade-strategy eager "
        "-e .[test]"
    )
    assert calls[-1] == (
        "pip install -q --no-warn-conflicts -c .venv-latest/fastgim-constraints.txt --upgrade --upgrade-strategy eager "
        "--no-deps inseq"
    )
    assert (repo / ".venv-latest" / "fastgim-constraints.txt").read_text() == "torch==2.13.0\n"
    assert len(_setup(repo, "--latest")) == len(calls)
    with pytest.raises(subprocess.CalledProcessError):
        _setup(repo, "--bogus")
