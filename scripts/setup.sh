#!/usr/bin/env bash
# Install everything skingen needs on a fresh machine (idempotent: a second run changes nothing).
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

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PYTHON" -m pip install -q -r requirements.txt

# A CJK font for glyph rendering and the synthetic skins (Debian/Ubuntu; skipped when one is present).
if ! fc-list 2>/dev/null | grep -qi -E "wqy|noto.*cjk|source han"; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei) >/dev/null
  else
    echo "note: no CJK font found; install fonts-wqy-microhei (or pass --font to render_glyphs.py)" >&2
  fi
fi
