"""The plain-PyTorch baseline of the GPU refit benchmark (mmkernels/experiments/bench/
gpu_refit.py) computes what the fused op computes, so the benchmark compares the same
solver on the same objective; checked on the CPU against the CPU op."""

from __future__ import annotations

import torch

from mmkernels import heads
from mmkernels.experiments.bench.gpu_refit import (
    plain_pytorch_evaluations,
    plain_softmax_loss_grad,
)


def test_plain_evaluation_matches_the_op() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 200, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (200,), generator=g)
    w = 0.3 * torch.randn(2, 9, 4, generator=g, dtype=torch.float64)
    b = torch.randn(2, 4, generator=g, dtype=torch.float64)
    sw = torch.rand(200, generator=g, dtype=torch.float64)
    index = torch.tensor([2, 0])
    for weight in (None, sw):
        got = plain_softmax_loss_grad(z, y, w, b, weight, 0.7, index)
        want = torch.ops.mmkernels.softmax_regression_loss_grad(z, y, w, b, weight, 0.7, index)
        for a, c in zip(got, want, strict=True):
            torch.testing.assert_close(a, c)


def test_plain_evaluations_give_the_same_heads() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 300, 6, generator=g, dtype=torch.float64)
    y = (z[0, :, 0] > 0).long() + (z[1, :, 1] > 0).long()
    ours = heads.fit(z, y, task="classification")
    with plain_pytorch_evaluations():
        plain = heads.fit(z, y, task="classification")
    assert heads._ops is torch.ops.mmkernels
    torch.testing.assert_close(plain.coef, ours.coef, rtol=1e-5, atol=1e-6)
