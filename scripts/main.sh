#!/usr/bin/env bash
# The main job: sets up, then runs the demo of the fused ops and the CPU benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${MMKERNELS_VENV:-.venv}/bin/python" -m mmkernels demo "$@"
