#!/usr/bin/env bash
# Builds a wheel against the pinned torch (no build isolation, no dependencies), installs it
# into a fresh venv beside that torch, and smoke-tests it away from the source tree: the
# import, each op once (forward and backward), and `mmkernels --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(pwd)/${MMKERNELS_VENV:-.venv}/bin/python"
TORCH_SPEC=${MMKERNELS_TORCH:-torch==2.13.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps . -w "$WORK/dist"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" \
  "$WORK"/dist/mmkernels-*.whl
cd "$WORK"
"$WORK/venv/bin/python" - <<'PYEOF'
import torch

import mmkernels

assert "site-packages" in mmkernels.__file__, mmkernels.__file__
ops = torch.ops.mmkernels
xs = [torch.randn(5, d, requires_grad=True) for d in (3, 4)]
mask = torch.tensor([[True, False], [True, True], [False, True], [True, True], [True, True]])
w = torch.randn(6, 7, requires_grad=True)
mmkernels.concat_project(xs, w, sample_mask=mask).sum().backward()
ws = [torch.randn(2, 3, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
mmkernels.project_concat(xs, ws, sample_mask=mask).sum().backward()
z = torch.randn(2, 5, 3)
ops.gram(z, torch.randn(5, 1))
ops.softmax_regression_loss_grad(z, torch.tensor([0, 1, 0, 1, 1]), torch.zeros(2, 3, 2),
                                 torch.zeros(2, 2), None, 1.0)
print("wheel smoke test: ok,", mmkernels.build_info()["torch_version"])
PYEOF
"$WORK/venv/bin/mmkernels" --help > /dev/null
echo "wheel_check: $(basename "$WORK"/dist/mmkernels-*.whl) installs and runs"
