#!/usr/bin/env bash
# Creates a virtual environment and installs fastgim (editable) with its test extras.
#   bash scripts/setup_env.sh            ./.venv: every package at the exact version in constraints.txt,
#                                        the set the test suite last passed on (reproducible).
#   bash scripts/setup_env.sh --latest   ./.venv-latest: the newest releases, constraints.txt ignored
#                                        (bash scripts/test.sh --latest runs the suite there).
# torch is always the CPU build FASTGIM_TORCH_VERSION (default 2.13.0), installed first so that nothing
# pulls the CUDA wheels. More extras: FASTGIM_EXTRAS=tlens (comma-separated).
# A stamp in the venv records what was installed (a hash of pyproject.toml, setup.py, constraints.txt,
# the extras, torch and python); while it matches, nothing is installed again. fastgim is installed
# editable, so changes to its code need no re-install. Regenerate constraints.txt after a passing run:
#   see the header of constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
mode=pinned
for arg in "$@"; do
  case "$arg" in
    --latest) mode=latest ;;
    *) echo "setup_env.sh: unknown argument '$arg' (the only option is --latest)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${FASTGIM_TORCH_VERSION:-2.13.0}
EXTRAS="test${FASTGIM_EXTRAS:+,$FASTGIM_EXTRAS}"
VENV=.venv
if [ "$mode" = latest ]; then VENV=.venv-latest; fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"

# The constraints the install uses: constraints.txt with torch set to TORCH_VERSION (pinned), or torch alone (latest).
pins="$VENV/fastgim-constraints.txt"
if [ "$mode" = pinned ]; then
  grep -v '^torch==' constraints.txt > "$pins"
else
  : > "$pins"
fi
echo "torch==$TORCH_VERSION" >> "$pins"

# The stamp: line 1 the hash of what decides the install, line 2 the extras installed with it.
stamp_file="$VENV/fastgim-install.stamp"
stamp="$(cat pyproject.toml setup.py "$pins" | sha256sum | cut -c1-16) $mode $(python -c 'import sys; print(sys.version.split()[0])')"
if [ "$mode" = pinned ] && [ -f "$stamp_file" ] && [ "$(head -n1 "$stamp_file")" = "$stamp" ]; then
  installed=",$(sed -n 2p "$stamp_file"),"
  missing=0
  for extra in ${EXTRAS//,/ }; do
    case "$installed" in *",$extra,"*) ;; *) missing=1 ;; esac
  done
  if [ "$missing" = 0 ]; then
    exit 0  # already installed from these files, with these extras
  fi
fi
rm -f "$stamp_file"
if [ "$mode" = latest ]; then
  python -m pip install -q --upgrade pip >/dev/null
  upgrade=(--upgrade --upgrade-strategy eager)
else
  upgrade=()
fi
python -m pip install -q -c "$pins" "torch==$TORCH_VERSION"
# --no-warn-conflicts: pip would list inseq's declared requirements that are deliberately not installed (below).
python -m pip install -q --no-warn-conflicts -c "$pins" "${upgrade[@]}" -e ".[$EXTRAS]"
# inseq for tests/test_integrations.py, without its declared CUDA 11 libraries and old typeguard (see pyproject.toml).
if ! log=$(python -m pip install -q --no-warn-conflicts -c "$pins" "${upgrade[@]}" --no-deps inseq 2>&1); then
  echo "$log" >&2
  exit 1
fi
printf "%s\n%s\n" "$stamp" "$EXTRAS" > "$stamp_file"
