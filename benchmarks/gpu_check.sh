#!/usr/bin/env bash
# The GPU path on a lent GPU machine, in under 5 minutes: the CUDA tests, parity with the CUDA
# provider, resnet50 and lite0 images/s end to end and model-only, one AMP fine-tune epoch.
#
#   bash benchmarks/gpu_check.sh [IMAGES_DIR] [TRAIN_DIR] [VAL_DIR]
#
# IMAGES_DIR: JPEGs to score (default: 4096 synthetic photos); TRAIN_DIR: class folders for the
# AMP epoch (e.g. a copy of hymenoptera_data/train carried along; skipped without one); VAL_DIR:
# real JPEGs the parity gate checks (e.g. hymenoptera_data/val). $GPU_CHECK_STEPS: a subset of
# gpu_check.py's steps (default all).
# Packages the machine lacks (onnxruntime-gpu, pydantic, simplejpeg, ...) can travel as wheels
# in .whl/ (see docs/scoring.md, "The GPU path"); they are installed into /tmp/site first.
# Prints a report; with $OUT set, also writes $OUT/gpu_check.json and $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
started=$(date +%s)
{
  echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "== CUDA tests"
  timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/scoring/test_gpu_path.py tests/scoring/test_runtime.py tests/export/test_half_precision.py
  echo "tests exit $?"
  echo "== parity, images/s, AMP epoch"
  timeout 330 "$PY" benchmarks/gpu_check.py ${1:+--images "$1"} ${2:+--train "$2"} \
    ${3:+--val "$3"} ${GPU_CHECK_STEPS:+--steps "$GPU_CHECK_STEPS"} --json "$OUT_DIR/gpu_check.json"
  echo "gpu_check.py exit $?"
  echo "== total $(( $(date +%s) - started )) s"
} 2>&1 | tee "$OUT_DIR/gpu_check.log"
