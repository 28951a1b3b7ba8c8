#!/usr/bin/env bash
# Installs headless Chromium (Debian packages chromium + chromium-driver) for the HTML rendering
# tests, when missing. Needs root (or passwordless sudo) and apt-get; exits 0 when Chromium is
# already there, 1 (with a message on stderr) when it cannot be installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium.sh: no apt-get here; install Chromium yourself to run the rendering tests" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_chromium.sh: not root and no passwordless sudo; cannot apt-get install chromium" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; then
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
fi
command -v chromium >/dev/null 2>&1
