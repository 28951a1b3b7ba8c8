#!/usr/bin/env bash
# The test suite (CPU): sets up the venv, lints, then runs pytest.
#   bash scripts/test.sh            in ./.venv, with the exact versions of constraints.txt (what CI runs)
#   bash scripts/test.sh --latest   in ./.venv-latest, against the newest releases of every dependency
#                                   (torch stays the pinned CPU build): an upstream change shows up here first
# Other arguments go to pytest, e.g. -k explain or tests/test_cli.py.
set -euo pipefail
cd "$(dirname "$0")/.."
setup=()
venv=.venv
pytest_args=()
for arg in "$@"; do
  if [ "$arg" = "--latest" ]; then
    setup=(--latest)
    venv=.venv-latest
  else
    pytest_args+=("$arg")
  fi
done
FASTGIM_EXTRAS=${FASTGIM_EXTRAS:-tlens} bash scripts/setup_env.sh "${setup[@]}"
. "$venv/bin/activate"
python -c "import sys, torch, transformers, triton; print('$venv: python', sys.version.split()[0], '| torch',
           torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
# Two pytest workers with one torch thread each use both cores without thread contention.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Headless Chromium for the HTML rendering test (Debian packages; the test skips with a message without it).
bash scripts/install_chromium.sh || echo "chromium unavailable: the HTML screenshot test will be skipped"
ruff check python kernels tests benchmarks scripts
python -m pytest -q -p no:cacheprovider --timeout=900 -n "${FASTGIM_TEST_WORKERS:-2}" --dist loadfile "${pytest_args[@]}"
