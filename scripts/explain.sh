#!/usr/bin/env bash
# The main job: GIM attribution with the bundled default model, offline.
# Sets up ./.venv on first use (later calls skip the install while pyproject.toml, setup.py and
# constraints.txt are unchanged). Extra arguments go to `fastgim explain`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$#" -eq 0 ]; then
  set -- --text "The capital of France is"
fi
.venv/bin/fastgim explain "$@"
