"""mmkernels: fused masked multi-modal ops, all-subset training and latent-quality refits."""

from __future__ import annotations

from mmkernels._native import load as _load_native

_C = _load_native()

# ops registers the fake kernels and autograd formulas on import.
from mmkernels import eta, heads, nn, ops, subsets  # noqa: E402
from mmkernels.ops import concat_project, project_concat  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict[str, object]:
    """The build of the native extension: torch version, whether CUDA is compiled in, archs."""
    import torch

    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info


__all__ = ["build_info", "concat_project", "eta", "heads", "nn", "ops", "project_concat",
           "subsets"]
