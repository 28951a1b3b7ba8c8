#!/usr/bin/env bash
# One-shot GPU check: GPU tests (triton vs sdpa vs reference), the attention benchmark, explain on the
# Llama-3.1-8B shape and the norm kernels' bandwidth -> benchmarks/results/gpu-check-<gpu>-<time>.json / .md.
#   bash scripts/gpu_check.sh             CUDA machine, under 8 minutes; needs only a CUDA torch (no network)
#   bash scripts/gpu_check.sh --dry-run   CPU: Triton interpreter, tiny sizes, every step (the test suite runs it)
# Other arguments go to the driver, benchmarks/gpu_check.py: --steps tests attention explain norms, --out DIR.
# PYTHON picks the interpreter (default: python3). Exit status 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import fastgim.kernels" 2>/dev/null; then
  # Offline install of this checkout: no dependencies, no CUDA extension build (it is optional and slow).
  FASTGIM_BUILD_CUDA=0 "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "gpu_check.sh: could not install fastgim from $(pwd); the steps will report the import error" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
