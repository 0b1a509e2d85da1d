"""Loads the compiled extension mmkernels._C, with errors that say how to fix a bad build."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

REBUILD = "rebuild it with: pip install --no-build-isolation -e ."


def load() -> ModuleType:
    """Import mmkernels._C, which also registers the native kernels under torch.ops.mmkernels."""
    try:
        native = importlib.import_module("mmkernels._C")
    except ModuleNotFoundError as err:
        raise ImportError(
            f"mmkernels._C (the native extension) was not found next to the package; {REBUILD}"
        ) from err
    except ImportError as err:
        # An undefined symbol almost always means the extension was compiled against another
        # torch than the one imported now.
        raise ImportError(
            f"mmkernels._C failed to load against torch {torch.__version__}: {err}. It was "
            f"probably built against another torch; {REBUILD}"
        ) from err
    built = native.build_info()["torch_version"]
    if built != torch.__version__:
        raise ImportError(
            f"mmkernels._C was built against torch {built} but torch {torch.__version__} is "
            f"imported; {REBUILD}"
        )
    return native


@functools.cache
def native() -> ModuleType:
    """The loaded extension, for modules that need its plain functions (mmkernels.memory)."""
    return load()
