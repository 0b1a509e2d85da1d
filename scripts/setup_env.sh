#!/usr/bin/env bash
# Creates .venv (once), installs the pinned CPU torch and the dependencies (again only when
# what pins them changes), and builds the extension in place, incrementally: ninja keeps its
# objects under build/, so a second run compiles nothing and a changed .cpp recompiles alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MMKERNELS_VENV:-.venv}
TORCH_SPEC=${MMKERNELS_TORCH:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
# The stamp records what the installed packages were resolved from; pip runs only when it
# differs (pip alone spends ~20 s confirming that nothing changed).
stamp="$VENV/.mmkernels-installed"
want=$( { echo "$TORCH_SPEC"; cat pyproject.toml; "$PY" --version; } | sha256sum | cut -d' ' -f1)
force=()
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch is pinned first, so that no later requirement swaps it for the newest CUDA build.
  pip_install "$TORCH_SPEC"
  pip_install "$TORCH_SPEC" ninja setuptools wheel
  # The package itself, editable, with the application's and the tests' extras; the extension
  # is left to the in-place build below (MMKERNELS_BUILD_EXT=0), which pip's editable build
  # would otherwise redo from scratch in a temporary folder on every install.
  MMKERNELS_BUILD_EXT=0 pip_install --no-build-isolation -e ".[experiments,test]" "$TORCH_SPEC"
  force=(--force)  # a new torch needs the extension rebuilt against it
fi
"$PY" setup.py -q build_ext --inplace "${force[@]}"
# The host emulator of the CUDA kernels (tests/cuda_emulator.py; ninja, incremental: nothing is
# compiled when nothing changed).
"$PY" tests/cuda_emulator.py > /dev/null
echo "$want" > "$stamp"
