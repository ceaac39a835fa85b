#!/usr/bin/env bash
# GPU proof in one call (issue 14): the Triton kernels checked against their references at the
# real shapes, timed against SDPA / flash / the HBM floor, and one full-size decoder layer timed
# with the kernels and with the reference path.
#
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run]
#
# Any CUDA host: the host's own python3 (or $PYTHON) with its torch and triton; nothing is
# installed into that Python and nothing is fetched from the network. The project goes on
# PYTHONPATH through a package tree made in a temporary folder (pyproject's package-dir maps
# m3_trt.plugins and m3_trt.export to the top-level folders plugins/ and export/). Python
# packages the host lacks travel as wheels in scripts/gpu_wheels/ (git-ignored), installed with
# pip --no-index into a temporary target folder. Budget: under 8 minutes on an H200.
#
# Writes under DIR (default benchmarks/results/gpu/, a folder of this command's own or a new
# one): kernels-<gpu>.json, layer-<gpu>.json, summary.txt, gpu_check.json, gpu_check.log.
# --dry-run: every step at tiny shapes on CPU with the kernels in Triton's interpreter (CI runs
# it), printing what the GPU run measures; its times are interpreter times, not figures.
# Exit status: 0 when every step ran, every correctness check passed and no step errored.
set -uo pipefail

usage() { echo "usage: bash scripts/gpu_check.sh [--out DIR] [--dry-run]" >&2; exit 2; }
OUT_DIR=benchmarks/results/gpu
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || usage; OUT_DIR=$2; shift 2 ;;
    --out=*) OUT_DIR=${1#--out=}; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
OUT_DIR=$(realpath -m -- "$OUT_DIR")  # relative to the caller's folder, before the cd below
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check.sh: no '$PY' on PATH (set PYTHON=...)" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/m3-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG=$WORK/gpu_check.log
START=$(date +%s)
log() { echo "$@" | tee -a "$LOG"; }

# Wheels for packages the host lacks: installed into a temporary target, never from an index.
WHEELS=$ROOT/scripts/gpu_wheels
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  log "installing $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS into a temporary folder"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl \
    2>&1 | tee -a "$LOG" || { echo "gpu_check.sh: installing the wheels in $WHEELS failed" >&2; exit 1; }
fi

# The package tree: m3_trt as in the repository, each package-dir mapping linked in as a subpackage.
"$PY" - "$ROOT" "$WORK/pkg" <<'EOF' || { echo "gpu_check.sh: could not build the package tree from pyproject.toml" >&2; exit 1; }
import os, sys, tomllib
root, dest = sys.argv[1:3]
with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
for name, src in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
    target = os.path.join(dest, *name.split("."))
    src = os.path.join(root, src)
    if "." not in name:  # a top package: a real folder of links, so mapped subpackages can join it
        os.makedirs(target)
        for entry in os.listdir(src):
            if entry != "__pycache__":
                os.symlink(os.path.join(src, entry), os.path.join(target, entry))
    else:
        if os.path.islink(target):
            os.unlink(target)
        os.symlink(src, target)
EOF
export PYTHONPATH="$WORK/pkg:$WORK/site:$ROOT/tests:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

FAILED=()
stage() {  # stage NAME SECONDS CMD...: runs one Python stage under a hard time limit, logged
  local name=$1 limit=$2; shift 2
  log "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  # 3: the output folder was refused (not ours): stop before anything is written into it
  [ "$rc" -ne 3 ] || { echo "gpu_check.sh: refusing --out $OUT_DIR (see the error above)" >&2; exit 3; }
  [ "$rc" -eq 0 ] || { FAILED+=("$name:rc=$rc"); log "== $name exited with $rc"; }
}

if [ "$DRY" -eq 1 ]; then
  export TRITON_INTERPRET=1
  stage kernels 600 "$PY" benchmarks/kernels.py --out "$OUT_DIR" --dry-run --section all
  stage layer 600 "$PY" benchmarks/gpu_layer.py --out "$OUT_DIR" --dry-run
else
  unset TRITON_INTERPRET  # the real kernels, never the interpreter, on a GPU host
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi 2>&1 | tee -a "$LOG"
  # soft budgets (steps past them are skipped and recorded) inside hard limits: 8 minutes in all
  stage kernels-check 140 "$PY" benchmarks/kernels.py --out "$OUT_DIR" --section check --budget-s 100
  stage kernels-time 220 "$PY" benchmarks/kernels.py --out "$OUT_DIR" --section time --budget-s 180
  stage layer 140 "$PY" benchmarks/gpu_layer.py --out "$OUT_DIR" --budget-s 110
fi
if [ ! -f "$OUT_DIR/summary.txt" ] || [[ " ${FAILED[*]-} " == *" layer:"* ]]; then
  MODE=$([ "$DRY" -eq 1 ] && echo --dry-run)
  stage summary 120 "$PY" benchmarks/kernels.py --out "$OUT_DIR" --summary $MODE
fi
STATUS=0
[ ${#FAILED[@]} -eq 0 ] || STATUS=1
if [ -f "$OUT_DIR/summary.txt" ] && grep -q "^verdict: problems" "$OUT_DIR/summary.txt"; then STATUS=1; fi
log "gpu_check: $(( $(date +%s) - START )) s, stages failed: ${FAILED[*]:-none}, exit $STATUS"
if [ -d "$OUT_DIR" ]; then cp "$LOG" "$OUT_DIR/gpu_check.log"; fi
exit $STATUS
