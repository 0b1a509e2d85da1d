"""What produced a result: Python, platform and package versions, the extension's build."""

from __future__ import annotations

import platform
import sys
from typing import Any

__all__ = ["versions"]


def versions() -> dict[str, Any]:
    """Python, platform and package versions, and the extension's build information."""
    import numpy
    import torch

    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "torch": torch.__version__, "numpy": numpy.__version__,
                           "torch_threads": torch.get_num_threads()}
    try:
        import sklearn

        out["scikit-learn"] = sklearn.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import mmkernels

        out["mmkernels"] = mmkernels.build_info()
    except Exception as exc:  # noqa: BLE001 - informational only
        out["mmkernels"] = f"unavailable: {exc}"
    return out
