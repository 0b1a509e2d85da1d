"""mmkernels: fused masked multi-modal ops, all-subset training and latent-quality refits.

The library needs torch and numpy only. Importing it loads the native extension and
:mod:`mmkernels.ops` (which registers the ops' autograd formulas); the other modules load on
first use (``mmkernels.nn``, ``mmkernels.heads``, ...). The application, data loaders,
sweeps, reports and the command line, is :mod:`mmkernels.experiments` (the
``[experiments]`` extra).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mmkernels._native import load as _load_native

_C = _load_native()

from mmkernels import ops  # noqa: E402  (after _C: it registers autograd on the native ops)
from mmkernels.ops import concat_project, project_concat  # noqa: E402

__version__ = "0.1.0"

_LAZY = ("cpu_memory", "eta", "heads", "memory", "nn", "reference", "subsets", "training")


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY:
        return importlib.import_module(f"mmkernels.{name}")
    raise AttributeError(f"module 'mmkernels' has no attribute {name!r}")


def build_info() -> dict[str, object]:
    """The build of the native extension: torch version, whether CUDA is compiled in, archs."""
    import torch

    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info


__all__ = ["build_info", "concat_project", "ops", "project_concat", *_LAZY]
