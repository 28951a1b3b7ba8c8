#!/usr/bin/env bash
# The test suite (CPU): sets up ./.venv, lints, then runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
FASTGIM_EXTRAS=${FASTGIM_EXTRAS:-tlens} bash scripts/setup_env.sh
. .venv/bin/activate
# Two pytest workers with one torch thread each use both cores without thread contention.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Headless Chromium for the HTML rendering test (Debian packages; the test skips with a message without it).
bash scripts/install_chromium.sh || echo "chromium unavailable: the HTML screenshot test will be skipped"
ruff check python kernels tests benchmarks scripts
python -m pytest -q -p no:cacheprovider --timeout=900 -n "${FASTGIM_TEST_WORKERS:-2}" --dist loadfile "$@"
