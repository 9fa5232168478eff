#!/usr/bin/env bash
# Install what the tests need, then run the whole suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# setup.sh makes .venv where the system Python refuses pip installs (PEP 668); use it when it is there.
PYTHON=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
# Scripts the tests start (demo.sh, `python3 ...`) run in the same environment as the tests.
PATH="$(cd "$(dirname "$(command -v "$PYTHON")")" && pwd):$PATH"
export PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m pytest "$@"
