#!/usr/bin/env bash
# Install everything skingen needs on a fresh machine (idempotent: a second run changes nothing).
# Installs the tested lock, requirements.lock (SKINGEN_DEPS=latest: the newest releases requirements.txt allows).
# CPU torch by default; on a GPU cluster install your CUDA torch first and this keeps it.
#
# Where the Python refuses pip installs into itself (PEP 668 "externally managed", e.g. Debian/Ubuntu's
# /usr/bin/python3), everything goes into a project virtualenv, .venv/, instead; scripts/test.sh and
# scripts/demo.sh then run with .venv/bin/python. An existing .venv is always used.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

# PEP 668: the marker file EXTERNALLY-MANAGED in the interpreter's stdlib folder; a virtualenv is never managed.
externally_managed() {
  "$1" -c 'import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if os.path.isfile(marker) and not in_venv else 1)'
}

if [ -x "$VENV/bin/python" ]; then
  PYTHON=$VENV/bin/python
elif externally_managed "$PYTHON"; then
  echo "setup: $PYTHON is externally managed (PEP 668); installing into the project virtualenv $VENV/"
  if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    echo "error: $PYTHON -m venv failed; install the venv module (Debian/Ubuntu: apt-get install python3-venv) and rerun" >&2
    exit 1
  fi
  PYTHON=$VENV/bin/python
fi

# torch first, by itself: an installed torch (a CUDA build on a cluster) is kept; otherwise the locked CPU build.
LOCKED_TORCH=$(sed -n 's/^torch==\([^ #]*\).*/\1/p' requirements.lock)
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==${TORCH_VERSION:-$LOCKED_TORCH}"
fi
# The rest: the tested lock (default), or the newest releases requirements.txt allows (SKINGEN_DEPS=latest;
# scripts/check_latest.sh tries those in a throw-away environment first).
case "${SKINGEN_DEPS:-lock}" in
  lock)
    grep -v -i '^torch==' requirements.lock > "${TMPDIR:-/tmp}/skingen-lock-$$.txt"
    "$PYTHON" -m pip install -q -r "${TMPDIR:-/tmp}/skingen-lock-$$.txt"
    rm -f "${TMPDIR:-/tmp}/skingen-lock-$$.txt"
    ;;
  latest)
    # torch stays as installed above (upgrading it from requirements.txt could replace a CUDA build)
    grep -v -i '^torch\b' requirements.txt > "${TMPDIR:-/tmp}/skingen-latest-$$.txt"
    "$PYTHON" -m pip install -q --upgrade -r "${TMPDIR:-/tmp}/skingen-latest-$$.txt"
    rm -f "${TMPDIR:-/tmp}/skingen-latest-$$.txt"
    ;;
  *)
    echo "error: SKINGEN_DEPS=${SKINGEN_DEPS}: choose lock (the tested versions, default) or latest" >&2
    exit 2
    ;;
esac

# A CJK font for glyph rendering and the synthetic skins (Debian/Ubuntu; skipped when one is present).
if ! fc-list 2>/dev/null | grep -qi -E "wqy|noto.*cjk|source han"; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei) >/dev/null
  else
    echo "note: no CJK font found; install fonts-wqy-microhei (or pass --font to render_glyphs.py)" >&2
  fi
fi
