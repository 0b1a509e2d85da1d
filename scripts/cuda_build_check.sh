#!/usr/bin/env bash
# Builds the extension with CUDA against the CUDA build of torch (no GPU needed), in a copy of
# the tracked sources so the in-place CPU build stays untouched, then imports that build and
# runs the CPU test suite on it. The CUDA venv is cached outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
CU_VENV=${MMKERNELS_CUDA_VENV:-$HOME/.cache/mmkernels/venv-cu}
if [ ! -x "$CU_VENV/bin/python" ]; then
  python3 -m venv "$CU_VENV"
fi
"$CU_VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 \
  "numpy>=1.24" "scikit-learn>=1.3" "tqdm>=4.60" "matplotlib>=3.6" pytest hypothesis "ray>=2.9" \
  ninja setuptools wheel
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$SRC"
cd "$SRC"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MMKERNELS_WITH_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} MAX_JOBS=${MAX_JOBS:-2}
"$CU_VENV/bin/python" setup.py -q build_ext --inplace
"$CU_VENV/bin/python" -c "
import mmkernels
info = mmkernels.build_info()
assert info['cuda'] and '9.0' in info['cuda_archs'], info
print('CUDA build:', info)
"
"$CU_VENV/bin/python" -m pytest tests -q -p no:cacheprovider -x
