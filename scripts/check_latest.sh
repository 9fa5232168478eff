#!/usr/bin/env bash
# The newest releases of every dependency, in a fresh virtual environment: installs them (the newest that
# requirements.txt allows; --no-upper-bounds ignores our caps), runs the suite, and prints which release broke which
# test. --write-lock moves requirements.lock to these versions when the whole suite passes.
#   bash scripts/check_latest.sh [--venv DIR] [--no-upper-bounds] [--write-lock] [-- pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/check_latest.py "$@"
