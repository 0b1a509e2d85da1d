#!/usr/bin/env bash
# The fused CUDA kernels' host emulator under AddressSanitizer and UBSan (issue 15): builds the
# sanitized emulator (build/emulator-asan, incrementally), then runs the emulator's own tests
# and the kernels' emulated property tests with the sanitizer runtimes preloaded (python is
# not instrumented). Fails on any report: an out-of-bounds access of a kernel in host memory,
# a use after free, undefined behaviour (signed overflow, misaligned or null access...).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MMKERNELS_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$(pwd)/$VENV" ;; esac
PY="$VENV/bin/python"
LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
LIBSTDCXX=$(gcc -print-file-name=libstdc++.so.6)
[ -f "$LIBASAN" ] && [ -f "$LIBUBSAN" ] || { echo "emulator_check: gcc's libasan/libubsan not found" >&2; exit 1; }
start=$(date +%s)
export MMKERNELS_EMULATOR_SANITIZE=1
"$PY" tests/cuda_emulator.py > /dev/null
echo "emulator_check: sanitized emulator built in $(( $(date +%s) - start )) s"
REPORTS=$(mktemp -d)
trap 'rm -rf "$REPORTS"' EXIT
export LD_PRELOAD="$LIBASAN $LIBUBSAN $LIBSTDCXX"
export ASAN_OPTIONS="detect_leaks=0:log_path=$REPORTS/asan:abort_on_error=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan"
status=0
CI=${CI:-1} "$PY" -m pytest -q -p no:cacheprovider tests/csrc/test_emulator.py \
  tests/ops/test_cuda_emulated.py || status=1
unset LD_PRELOAD
if ls "$REPORTS"/* > /dev/null 2>&1; then
  echo "emulator_check: sanitizer reports:" >&2
  for f in "$REPORTS"/*; do head -n 60 "$f" >&2; echo ... >&2; done
  status=1
fi
echo "emulator_check: $([ $status -eq 0 ] && echo clean || echo FAILED) in $(( $(date +%s) - start )) s"
exit $status
