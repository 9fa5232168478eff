#!/usr/bin/env bash
# Install everything skingen needs on a fresh machine (idempotent: a second run changes nothing).
# CPU torch by default; on a GPU cluster install your CUDA torch first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

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
