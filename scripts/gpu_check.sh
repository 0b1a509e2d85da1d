#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and no network (torch, nvcc, pytest and
# hypothesis already installed): build with CUDA, run the CUDA tests and the whole suite, run
# the GPU benchmarks, and write one report. Usage: bash scripts/gpu_check.sh [REPORT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu-report}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
REPORT="$DIR/report.md"
{
  echo "# mmkernels GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} > "$REPORT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0"} MMKERNELS_WITH_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if ! "$PY" -m pip install -q --no-build-isolation --no-deps -e . > "$DIR/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)" >> "$REPORT"; tail -40 "$DIR/build.log"; exit 1
fi
status=0
PYTHONUNBUFFERED=1 "$PY" -m pytest tests/ops/test_cuda.py tests -q -p no:cacheprovider \
  > "$DIR/tests.log" 2>&1 || status=$?
{ echo; echo "## tests (exit $status)"; tail -5 "$DIR/tests.log"; } >> "$REPORT"
PYTHONUNBUFFERED=1 "$PY" -m mmkernels.experiments.bench --device cuda --out "$DIR/bench_cuda.json" \
  > "$DIR/bench.log" 2>&1 || status=$?
{ echo; echo "## benchmarks"; echo '```'; cat "$DIR/bench.log"; echo '```'; } >> "$REPORT"
cat "$REPORT"
exit "$status"
