#!/usr/bin/env bash
# Builds the extension with CUDA against the CUDA build of torch (no GPU needed), in a copy of
# the tracked sources so the in-place CPU build stays untouched, then checks the build and runs
# a smoke test of it (a CUDA kernel for every op, registration, opcheck, Meta kernels: what the
# CUDA build adds; the CPU suite runs on the CPU build). The CUDA venv is cached outside the
# clone.
#   * ptxas's resource report (-Xptxas -v) of every fused and head-refit kernel and of the
#     L-BFGS direction kernel, for sm_80 and sm_90: no spill stores or loads and no stack frame
#     (local memory) in any of them;
#   * cuobjdump --list-elf: the extension carries sm_80 and sm_90 machine code.
# MMKERNELS_CUDA_BUILD_DIR=DIR builds in DIR instead (kept: a second run recompiles only what
# changed) -- for iterating on the kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
CU_VENV=${MMKERNELS_CUDA_VENV:-$HOME/.cache/mmkernels/venv-cu}
if [ ! -x "$CU_VENV/bin/python" ]; then
  python3 -m venv "$CU_VENV"
fi
"$CU_VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 \
  "numpy>=1.24" "scikit-learn>=1.3" "tqdm>=4.60" "matplotlib>=3.6" pytest hypothesis "ray>=2.9" \
  ninja setuptools wheel
if [ -n "${MMKERNELS_CUDA_BUILD_DIR:-}" ]; then
  SRC=$MMKERNELS_CUDA_BUILD_DIR
  mkdir -p "$SRC"
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp -u --parents -t "$SRC"
else
  SRC=$(mktemp -d)
  trap 'rm -rf "$SRC"' EXIT
  git ls-files -z | xargs -0 cp --parents -t "$SRC"
fi
cd "$SRC"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MMKERNELS_WITH_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} MAX_JOBS=${MAX_JOBS:-2}
export MMKERNELS_NVCC_FLAGS="-Xptxas -v"
start=$(date +%s)
"$CU_VENV/bin/python" setup.py build_ext --inplace > cuda-build.log 2>&1 \
  || { tail -60 cuda-build.log; exit 1; }
echo "cuda_build_check: built in $(( $(date +%s) - start )) s"

# ptxas reports, per kernel and arch: "Compiling entry function 'NAME' for 'sm_XX'", then
# "N bytes stack frame, N bytes spill stores, N bytes spill loads". Every fused kernel
# (fused_*_kernel), head-refit kernel (gram_*, softmax_*) and lbfgs_kernel must show zeros.
"$CU_VENV/bin/python" - cuda-build.log <<'EOF'
import re
import sys

text = open(sys.argv[1]).read()
entries = re.findall(
    r"Compiling entry function '(\w+)' for '(sm_\d+)'.*?(\d+) bytes stack frame, (\d+) bytes "
    r"spill stores, (\d+) bytes spill loads",
    text,
    flags=re.S,
)
fused = [e for e in entries
         if any(k in e[0] for k in ("fused_", "gram_", "softmax_", "lbfgs_"))]
bad = [e for e in fused if any(int(v) for v in e[2:])]
archs = sorted({e[1] for e in fused})
print(f"cuda_build_check: {len(fused)} fused and head kernel builds ({', '.join(archs)}), "
      f"{len(bad)} with spills or a stack frame")
for name, arch, *counts in bad:
    print(f"  {arch} {name}: stack {counts[0]} B, spill stores {counts[1]} B, loads {counts[2]} B")
if not fused or bad or archs != ["sm_80", "sm_90"]:
    sys.exit("cuda_build_check: the fused kernels must build for sm_80 and sm_90 without "
             "spills or local memory")
EOF

SO=$(ls mmkernels/_C*.so)
CUOBJDUMP=$(command -v cuobjdump || true)
# (ls fails on the candidates that do not exist: || true, or pipefail + set -e would end the
# script here without a word.)
[ -n "$CUOBJDUMP" ] || CUOBJDUMP=$( (ls "$CUDA_HOME"/bin/cuobjdump \
  "$CU_VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null \
  || true) | head -1)
[ -n "$CUOBJDUMP" ] || { echo "cuda_build_check: no cuobjdump found" >&2; exit 1; }
elfs=$("$CUOBJDUMP" --list-elf "$SO")
echo "$elfs" | grep -q "sm_90" || { echo "cuda_build_check: no sm_90 code in $SO" >&2; echo "$elfs"; exit 1; }
echo "$elfs" | grep -q "sm_80" || { echo "cuda_build_check: no sm_80 code in $SO" >&2; echo "$elfs"; exit 1; }
echo "cuda_build_check: $(echo "$elfs" | grep -c "sm_90") sm_90 and $(echo "$elfs" | grep -c "sm_80") sm_80 ELF images in $(basename "$SO")"

"$CU_VENV/bin/python" -c "
import mmkernels
info = mmkernels.build_info()
assert info['cuda'] and '9.0' in info['cuda_archs'], info
print('CUDA build:', info)
"
# What the CUDA build adds to the CPU build, checked without a GPU: the library loads against
# the CUDA torch with a CUDA kernel for every op, and the ops' registration, schemas, Meta
# kernels and opcheck pass in this build. The CPU suite itself runs on the CPU build
# (scripts/test.sh) and the kernels' code through the host emulator (scripts/emulator_check.sh):
# rerunning all of it here took most of this check's time.
start=$(date +%s)
"$CU_VENV/bin/python" -c "
import torch
import mmkernels  # loads the extension
for op in ('concat_project', 'concat_project_backward', 'project_concat',
           'project_concat_backward', 'gram', 'softmax_regression_loss_grad', 'lbfgs_direction'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('mmkernels::' + op, 'CUDA'), op
print('cuda_build_check: every op has a CUDA kernel')
"
"$CU_VENV/bin/python" -m pytest -q -p no:cacheprovider -x tests/test_package.py \
  tests/ops/test_fused_ops_registration.py tests/csrc/test_build.py tests/csrc/test_cuda_lint.py \
  tests/heads/test_heads.py tests/heads/test_lbfgs_direction.py \
  -k "opcheck or registration or build or lint or package or meta"
echo "cuda_build_check: smoke tests in $(( $(date +%s) - start )) s"
