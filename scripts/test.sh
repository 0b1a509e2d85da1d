#!/usr/bin/env bash
# The test suite: sets up, checks style, runs pytest. Fails when pytest collects no test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY="${MMKERNELS_VENV:-.venv}/bin/python"
"$PY" -m ruff check mmkernels tests
status=0
"$PY" -m pytest tests -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
fi
exit "$status"
