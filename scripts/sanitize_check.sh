#!/usr/bin/env bash
# The native code under AddressSanitizer (issue 8): builds the extension with
# -fsanitize=address in a copy of the sources (the in-place build stays untouched), then runs a
# small corpus with gcc's libasan preloaded (python and torch are not instrumented):
#   * a fixed, derandomised slice of the op-boundary fuzzer (every op, forward and backward,
#     gram, softmax_regression_loss_grad and lbfgs_direction, the head refits; valid and
#     invalid arguments),
#   * the fuzzer's regression tests, the parity tests' representative shapes, the error tests
#     the blocked (AMX / brgemm) GEMM paths, and the head-refit tests (gram,
#     softmax_regression_loss_grad, lbfgs_direction).
# Fails on any ASan report (reports go to files, so one in a fuzz worker counts too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(pwd)/${MMKERNELS_VENV:-.venv}/bin/python"
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBSTDCXX=$(gcc -print-file-name=libstdc++.so.6)
[ -f "$LIBASAN" ] || { echo "sanitize_check: gcc's libasan.so not found" >&2; exit 1; }
WORK=$(mktemp -d)
# MMKERNELS_ASAN_KEEP=1 keeps the build and the reports (the folder is printed).
[ -n "${MMKERNELS_ASAN_KEEP:-}" ] && echo "sanitize_check: working in $WORK" || trap 'rm -rf "$WORK"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK" 2>/dev/null || true
cd "$WORK"
start=$(date +%s)
MMKERNELS_SANITIZE=address MMKERNELS_WITH_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py -q build_ext --inplace > build.log 2>&1 || { cat build.log; exit 1; }
echo "sanitize_check: ASan build in $(( $(date +%s) - start )) s"
mkdir -p asan
# libstdc++ preloaded too: python does not link it, and ASan must find __cxa_throw at start.
export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
# detect_leaks=0: python and torch keep memory until exit; the others: torch's own mixes of
# allocators and its ODR layout are not ours to judge.
export ASAN_OPTIONS="detect_leaks=0:log_path=$WORK/asan/report:abort_on_error=1:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:detect_odr_violation=0"
export PYTHONPATH="$WORK" MMKERNELS_FUZZ_SCALE=${MMKERNELS_FUZZ_SCALE:-0.3} CI=1
status=0
"$PY" -c "import mmkernels, torch; assert mmkernels.__file__.startswith('$WORK'), mmkernels.__file__" \
  || status=1
"$PY" -m pytest -q -p no:cacheprovider tests/fuzz/test_fuzz_boundary.py \
  tests/ops/test_fused_ops_parity.py tests/ops/test_fused_ops_errors.py tests/ops/test_blocked_gemms.py \
  tests/heads/test_heads.py tests/heads/test_lbfgs_direction.py || status=1
unset LD_PRELOAD
if ls asan/report* > /dev/null 2>&1; then
  echo "sanitize_check: AddressSanitizer reports:" >&2
  for f in asan/report*; do head -n 60 "$f" >&2; echo ... >&2; done
  status=1
fi
echo "sanitize_check: $([ $status -eq 0 ] && echo clean || echo FAILED) in $(( $(date +%s) - start )) s"
exit $status
