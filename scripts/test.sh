#!/usr/bin/env bash
# The test command: set up .venv, then run the whole CPU suite. Triton kernels run in the
# Triton interpreter where no GPU is present (TRITON_INTERPRET must be set before triton loads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export TRITON_INTERPRET=1
fi
# Two worker processes (pytest-xdist), whole files per worker so module fixtures are made once;
# M3_TEST_WORKERS=0 runs in one process.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${M3_TEST_WORKERS:-2}" --dist loadfile "$@"
