#!/usr/bin/env bash
# Every benchmark suite (benchmarks/test_bench_*.py), then the plots and table (benchmarks/report.py).
#   bash scripts/bench.sh          CPU sizes, in ./.venv (created by scripts/setup_env.sh)
#   bash scripts/bench.sh --gpu    GPU sizes: attention at N = 1k..32k and explain on the
#                                  Llama-3.1-8B-shaped model (bf16) at N = 1k, 4k, 16k, 32k,
#                                  with the python on PATH (it needs a CUDA build of torch).
# Other arguments go to pytest, e.g. -k explain, --lengths 4096, --rounds 5, --benchmark-disable.
# Results: benchmarks/results/<suite>-<cpu|gpu>.json, *.png and README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=cpu
for arg in "$@"; do
  if [ "$arg" = "--gpu" ]; then scale=gpu; fi
done
if [ "$scale" = cpu ]; then
  bash scripts/setup_env.sh
  . .venv/bin/activate
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
else
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
    f'bench.sh --gpu: no CUDA device for {sys.executable} (torch {torch.__version__})')"
  if ! python -c "import fastgim" 2>/dev/null; then  # offline install of this checkout, no dependencies
    python -m pip install -q --no-deps --no-build-isolation -e .
  fi
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p benchmarks/results
json=()
if python -c "import pytest_benchmark" 2>/dev/null; then
  json=(--benchmark-json "benchmarks/results/pytest-benchmark-$scale.json")
fi
status=0
python -m pytest benchmarks -p no:cacheprovider -q "${json[@]}" "$@" || status=$?
python benchmarks/report.py
exit "$status"
