#!/usr/bin/env bash
# Creates .venv (once), installs the pinned CPU torch and the dependencies, and builds the
# extension in place. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MMKERNELS_VENV:-.venv}
TORCH_SPEC=${MMKERNELS_TORCH:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# torch is pinned so pip never swaps it for the newest CUDA build.
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" \
  "numpy>=1.24" "scikit-learn>=1.3" "tqdm>=4.60" "matplotlib>=3.6" "pytest>=7" "hypothesis>=6" "ruff>=0.5" \
  "ray>=2.9" \
  ninja setuptools wheel
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
