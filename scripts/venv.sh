#!/usr/bin/env bash
# Create or reuse .venv at the repository root and install m3-trt (editable, with its console
# script and the dev extras). Reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[venv] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.m3-trt-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/m3-trt ]; then
  echo "[venv] installing m3-trt[dev] (pinned torch/torchvision/transformers; first time takes a few minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import m3_trt, torch, transformers" 
  echo "$want" > "$stamp"
fi
