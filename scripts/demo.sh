#!/usr/bin/env bash
# The main job on the embedded default: make the tiny checkpoint and run the product on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/m3-trt demo --workdir "${M3_DEMO_DIR:-artifacts/demo}" "$@"
