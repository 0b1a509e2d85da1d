"""Comparison against the float64 reference, with tolerances derived from the dtype.

The rule (after flash-attention's tests for half precision): the kernel's largest error
against the float64 oracle may be at most twice the largest error of plain PyTorch run in the
same dtype, plus a floor of a few units of rounding of the dtype at the result's scale, grown
with the square root of the longest sum behind an element (random rounding errors of n terms
grow like sqrt(n)). So a kernel passes when it is as accurate as PyTorch itself, whatever the
dtype; the floor matters where PyTorch is the oracle (float64) or happens to be exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}


def assert_matches_oracle(
    ours: Tensor, same_dtype: Tensor, oracle: Tensor, what: str, reduction: int = 1,
    eps: float | None = None,
) -> None:
    """eps: the unit of rounding when it is not the dtype's own (TF32 arithmetic on float32
    tensors: 2**-10)."""
    assert ours.shape == oracle.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert ours.dtype == same_dtype.dtype, f"{what}: dtype {ours.dtype} != {same_dtype.dtype}"
    if oracle.numel() == 0:
        return
    oracle = oracle.double()
    ours_err = (ours.double() - oracle).abs().max().item()
    torch_err = (same_dtype.double() - oracle).abs().max().item()
    scale = max(oracle.abs().max().item(), 1.0)
    unit = EPS[ours.dtype] if eps is None else eps
    bound = 2 * torch_err + 8 * unit * scale * max(reduction, 1) ** 0.5
    assert ours_err <= bound, (
        f"{what}: max error {ours_err:.3g} against float64 exceeds {bound:.3g} "
        f"(PyTorch in {ours.dtype}: {torch_err:.3g}, scale {scale:.3g})"
    )
