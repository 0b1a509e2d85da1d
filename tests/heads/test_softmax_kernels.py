"""The softmax op's CPU kernel families across their dispatch boundaries (csrc/cpu/heads/
softmax_dispatch.h: rows in lanes for C <= 16, classes in 32 padded lanes for 17..32, the
generic body above), against the float64 oracle with the tolerances of tests/oracle.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import assert_matches_oracle

import mmkernels  # noqa: F401  (registers the ops)
from mmkernels import reference

ops = torch.ops.mmkernels


def _case(C, H, n, S, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(S, n, H, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    pick = torch.randint(0, S, (max(1, S - 1),), generator=g)  # repeats and omissions
    w = 0.3 * torch.randn(len(pick), H, C, generator=g, dtype=torch.float64)
    b = torch.randn(len(pick), C, generator=g, dtype=torch.float64)
    sw = torch.rand(n, generator=g, dtype=torch.float64)
    return z, y, pick, w, b, sw


def _check(C, H, n, S, seed, dtype):
    z64, y, pick, w64, b64, sw64 = _case(C, H, n, S, seed, dtype)
    z, w, b, sw = (t.to(dtype) for t in (z64, w64, b64, sw64))
    got = ops.softmax_regression_loss_grad(z, y, w, b, sw, 0.7, pick)
    again = ops.softmax_regression_loss_grad(z, y, w, b, sw, 0.7, pick)
    same = reference.softmax_regression_loss_grad(z, y, w, b, sw, 0.7, pick)
    oracle = reference.softmax_regression_loss_grad(z64, y, w64, b64, sw64, 0.7, pick)
    for name, ours, rerun, s, o in zip(("loss", "gw", "gb"), got, again, same, oracle,
                                       strict=True):
        assert torch.isfinite(ours).all(), f"{name}: not finite at C = {C}, H = {H}"
        assert torch.equal(ours, rerun), f"{name}: two calls differ at C = {C}, H = {H}"
        assert_matches_oracle(ours, s, o, f"{name} at C = {C}, H = {H}, n = {n}",
                              reduction=n * (H + C))


# Every class count from 1 to 20 (the 16-lane boundary, the 32-lane kernel above it) at an H
# below one vector, one with a tail, and one above the gradient's register block; n > 256 and
# not a multiple of 16 (a partial row block and several float32 -> float64 flushes).
@pytest.mark.parametrize("C", range(1, 21))
@pytest.mark.parametrize("H", [3, 37, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_class_count_matches_the_oracle(C, H, dtype):
    _check(C, H, 601, 3, 100 * C + H, dtype)


@settings(max_examples=40, deadline=None)
@given(C=st.integers(1, 40), H=st.integers(1, 140), n=st.integers(1, 300),
       S=st.integers(1, 4), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_any_shape_matches_the_oracle(C, H, n, S, seed, dtype):
    _check(C, H, n, S, seed, dtype)


@pytest.mark.parametrize("C", [10, 16])
def test_extreme_logits_stay_finite(C):
    # Logits of +-1e4: the kernel's exp clamps, and the loss and gradient stay finite.
    z = torch.zeros(1, 40, 16)
    z[0, :, 0] = 1.0
    y = torch.arange(40) % C
    w = torch.zeros(1, 16, C)
    w[0, 0] = torch.linspace(-1e4, 1e4, C)
    b = torch.zeros(1, C)
    for t in ops.softmax_regression_loss_grad(z, y, w, b, None, 0.0):
        assert torch.isfinite(t).all()


# Problems next to each other on the same subset (a cross-validation's folds) are solved at once
# by the grouped kernel (softmax_grouped.h; float32 where oneDNN's ukernels run, else one by
# one): runs of 1 to 7 problems (above 64 / C a run is split), H across the gradient's 64-column
# blocks, n across the 256-row chunks. With torch.backends.mkldnn off the op solves them one
# by one: both ways match the oracle.
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("C", [1, 3, 10, 16])
@pytest.mark.parametrize("H", [5, 130])
@pytest.mark.parametrize("n", [1, 255, 601])
@pytest.mark.parametrize("mkldnn", [True, False])
def test_problems_of_one_subset_side_by_side_match_the_oracle(C, H, n, mkldnn):
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        _check_runs(C, H, n, torch.tensor([0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 0, 1, 1]),
                    torch.float32, 10 * C + H + n)


def test_side_by_side_problems_split_over_threads_match_the_oracle():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # rows split in 2 blocks per group: n > 1024 and few groups
        _check_runs(10, 521, 2100, torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]), torch.float32, 7)
    finally:
        torch.set_num_threads(threads)


def _check_runs(C, H, n, pick, dtype, seed):
    z64, y, _, _, _, sw64 = _case(C, H, n, int(pick.max()) + 1, seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    w64 = 0.3 * torch.randn(len(pick), H, C, generator=g, dtype=torch.float64)
    b64 = torch.randn(len(pick), C, generator=g, dtype=torch.float64)
    z, w, b, sw = (t.to(dtype) for t in (z64, w64, b64, sw64))
    for weights, weights64 in ((sw, sw64), (None, None)):
        got = ops.softmax_regression_loss_grad(z, y, w, b, weights, 0.7, pick)
        same = reference.softmax_regression_loss_grad(z, y, w, b, weights, 0.7, pick)
        oracle = reference.softmax_regression_loss_grad(z64, y, w64, b64, weights64, 0.7, pick)
        for name, ours, s, o in zip(("loss", "gw", "gb"), got, same, oracle, strict=True):
            assert torch.isfinite(ours).all(), f"{name}: not finite at C = {C}, H = {H}"
            assert_matches_oracle(ours, s, o, f"{name} at C = {C}, H = {H}, n = {n}",
                                  reduction=n * (H + C))
