#!/usr/bin/env bash
# The main job: sets up, then reproduces the paper (mmkernels reproduce: Table 4 on synthetic
# data, Tables 1-3 and the follow-ups on the bundled real data) into results/.
# Extra arguments go to `mmkernels reproduce` (e.g. --quick, --iemocap PATH, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${MMKERNELS_VENV:-.venv}/bin/python" -m mmkernels reproduce "$@"
