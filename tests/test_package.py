"""The package's layers: the library needs torch and numpy only, and no import runs back up.

    library      mmkernels.{ops, reference, nn, training, heads, eta, subsets, memory}
    application  mmkernels.experiments: data  <  sweeps, results  <  bench  <  cli
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmkernels"

USE_THE_LIBRARY = """
import sys

BLOCKED = ("sklearn", "matplotlib", "tqdm", "ray")

for name in BLOCKED:  # "import NAME" now raises ImportError; find_spec(NAME) gives None
    sys.modules[name] = None
import torch

import mmkernels
from mmkernels import eta, heads, memory, nn, ops, reference, subsets, training

xs = [torch.randn(64, 3), torch.randn(64, 5)]
y = (xs[0][:, 0] > 0).long()
model = nn.SubsetEnsemble([3, 5], 8, 2, fusion="late")
training.fit(model, xs, y, epochs=2, batch_size=32, progress=True)
eta.refit_quality(model.latents, xs, y, xs, y, task="classification")
leaked = sorted(m for m, v in sys.modules.items() if m.split(".")[0] in BLOCKED and v)
assert not leaked, leaked
app = sorted(m for m in sys.modules if m.startswith("mmkernels.experiments"))
assert not app, app
print("ok")
"""


def test_the_library_imports_nothing_beyond_torch_and_numpy():
    proc = subprocess.run([sys.executable, "-c", USE_THE_LIBRARY], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    """The mmkernels modules a file imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("mmkernels")}


def _layer(module: str) -> int:
    """0 library, 1 application data, 2 sweeps and results, 3 bench, 4 the command line."""
    if not module.startswith("mmkernels.experiments"):
        return 0
    rest = module.split(".")[2:]
    if not rest:
        return 2
    return {"data": 1, "bench": 3, "cli": 4, "__main__": 4}.get(rest[0], 2)


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_import_runs_back_up_the_layers(path):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if module == "mmkernels.__main__":  # the launcher of the command line
        return
    upward = sorted(m for m in _imports(path) if _layer(m) > _layer(module))
    assert not upward, f"{module} imports {upward} from a layer above it"
