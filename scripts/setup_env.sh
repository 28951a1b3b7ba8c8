#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs fastgim with its test extras.
# torch is pinned to the CPU build first so that nothing pulls the CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==${FASTGIM_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[test${FASTGIM_EXTRAS:+,$FASTGIM_EXTRAS}]"
