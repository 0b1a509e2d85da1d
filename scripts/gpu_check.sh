#!/usr/bin/env bash
# The GPU check (issue 16), one command for the lent H200 (16 cores, python3 with its own torch
# + CUDA 13, pytest, hypothesis, scikit-learn; no network). Usage:
#     bash scripts/gpu_check.sh [REPORT_DIR]          # default $OUT, else gpu-report/
# Stages, each under `timeout`, its log tee'd into REPORT_DIR; the whole command stays under
# 7 minutes (the limits below sum to 390 s, plus 5 s of grace each), so a 15-minute device
# budget holds one rerun. Predicted times are estimates for that machine, not readings:
#   1. build   sm_90 only, in place, 16 jobs          predicted  ~90 s   limit 150 s
#      (16 translation units in parallel; the longest, fused_backward.cu, bounds the wall time)
#   2. tests   the CUDA tests only: parity of every op and head op on both CUDA backends,
#      poisoned outputs, NaN in absent rows, float64 gradcheck, opcheck, torch.compile,
#      CUDA graph capture and replay, autocast fp16 / bf16, run-to-run determinism; the head
#      refits and a sweep cell on the GPU              predicted ~100 s   limit 140 s
#   3. bench   targets 3a-3e (mmkernels bench --device cuda): the fused ops with the copy
#      bandwidth and GEMM rate measured in the same run, float32 with and without TF32, the
#      softmax refit against scikit-learn and plain-PyTorch L-BFGS
#                                                      predicted  ~80 s   limit 100 s
# A failed build stops the check; failed tests do not stop the benchmarks. The exit status is
# that of the first stage that failed (124: it ran out of time).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu-report}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
REPORT="$DIR/report.md"
status=0

stage() {  # NAME PREDICTED_S LIMIT_S COMMAND...: runs COMMAND, its output tee'd to NAME.log
  local name=$1 predicted=$2 limit=$3
  shift 3
  echo "## $name (predicted ~${predicted} s, limit ${limit} s)" | tee -a "$REPORT"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$DIR/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$REPORT"
  [ "$status" -ne 0 ] || status=$rc
  return "$rc"
}

{
  echo "# mmkernels GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
} 2>&1 | tee "$REPORT"

export TORCH_CUDA_ARCH_LIST=9.0 MMKERNELS_WITH_CUDA=1 MAX_JOBS=16
stage build 90 150 "$PY" setup.py build_ext --inplace || { cat "$REPORT"; exit "$status"; }

export PYTHONUNBUFFERED=1
stage tests 100 140 "$PY" -m pytest -q -p no:cacheprovider -rs tests/ops/test_cuda.py \
  tests/heads/test_heads_cuda.py

stage bench 80 100 "$PY" -m mmkernels.experiments.bench --device cuda --repeats 5 \
  --out "$DIR/bench_cuda.json"

{ echo; echo "## tests (last lines)"; tail -5 "$DIR/tests.log"; echo; echo "## benchmarks"
  echo '```'; cat "$DIR/bench.log"; echo '```'; } >> "$REPORT"
echo "gpu_check: exit $status; report in $REPORT"
exit "$status"
