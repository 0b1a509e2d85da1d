"""Absent rows never reach a result or a gradient, whatever they hold.

Real missing modalities arrive as NaN, Inf or garbage. On both sides of the CPU engine's gather
threshold (kGatherBelow in csrc/cpu/gemm_engine.h: a modality present in more than 80 % of the
samples is multiplied on all its rows), every output and every gradient must be finite and
equal to the run with the absent rows zeroed, and the absent rows' own gradients must be zero.
The reference is held to the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fused_ops_parity import Problem, call

import mmkernels
from mmkernels import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
GATHER_BELOW = 0.8  # csrc/cpu/gemm_engine.h: kGatherBelow


@dataclass
class Poisoned:
    problem: Problem
    present_rows: list[int]  # per modality: how many samples have it
    poisons: list[float | str]  # what absent rows hold ("max": the dtype's largest value)


def _poison_value(poison: float | str, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max if poison == "max" else float(poison)


@st.composite
def poisoned_problems(draw, op: str, device: str) -> Poisoned:
    K = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 40))
    layout = draw(st.sampled_from(["plain", "shared_subsets", "per_subset"]))
    if op == "concat_project":
        widths = [draw(st.integers(1, 9))]
    else:
        widths = draw(st.lists(st.integers(1, 6), min_size=K, max_size=K))
    # Each modality lands on one side of the threshold or the other: gathered or dense.
    cut = math.floor(GATHER_BELOW * batch)
    present_rows = [
        draw(st.one_of(st.integers(0, cut), st.integers(min(cut + 1, batch), batch)))
        for _ in range(K)
    ]
    poisons = draw(
        st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, "max"]),
                 min_size=1, max_size=4)
    )
    problem = Problem(
        op=op,
        dims=draw(st.lists(st.integers(1, 12), min_size=K, max_size=K)),
        batch=batch,
        widths=widths,
        num_subsets=None if layout == "plain" else draw(st.integers(1, min(2**K, 6))),
        per_subset=layout == "per_subset",
        sample_present=1.0,  # replaced by present_rows below
        bias=draw(st.booleans()),
        activation=draw(st.sampled_from(["relu", "none"])),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
        device=device,
    )
    return Poisoned(problem, present_rows, poisons)


def inputs(case: Poisoned):
    """The problem's tensors, a sample_mask with present_rows[k] rows of each modality, and
    xs twice: absent rows poisoned, and absent rows zero."""
    p = case.problem
    xs, weights, biases, subset_mask, _ = p.tensors()
    gen = torch.Generator().manual_seed(p.seed + 2)
    mask = torch.zeros(p.batch, len(p.dims), dtype=torch.bool)
    for k, n in enumerate(case.present_rows):
        mask[torch.randperm(p.batch, generator=gen)[:n], k] = True
    values = torch.tensor([_poison_value(v, p.dtype) for v in case.poisons], dtype=torch.float64)
    poisoned, zeroed = [], []
    for k, x in enumerate(xs):
        pick = torch.randint(len(values), x.shape, generator=gen)
        junk = values[pick].to(device=p.device, dtype=p.dtype)
        keep = mask[:, k : k + 1].to(p.device)
        poisoned.append(torch.where(keep, x, junk))
        zeroed.append(torch.where(keep, x, torch.zeros_like(x)))
    return poisoned, zeroed, weights, biases, subset_mask, mask.to(p.device)


def run(case: Poisoned, impl, xs, weights, biases, subset_mask, sample_mask):
    """The output and the gradients of every input, for a fixed finite grad_out."""
    p = case.problem
    leaves = [t.detach().clone().requires_grad_(True) for t in (*xs, *weights, *biases)]
    K, W = len(xs), len(weights)
    out = call(p, impl, leaves[:K], leaves[K : K + W], leaves[K + W :], subset_mask, sample_mask,
               p.activation)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(p.seed + 1),
                           dtype=torch.float64).to(device=p.device, dtype=p.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads[:K], grads[K:]


def check(case: Poisoned, impl) -> None:
    poisoned, zeroed, weights, biases, subset_mask, sample_mask = inputs(case)
    out, gx, gp = run(case, impl, poisoned, weights, biases, subset_mask, sample_mask)
    out0, gx0, gp0 = run(case, impl, zeroed, weights, biases, subset_mask, sample_mask)
    assert torch.isfinite(out).all(), "an absent row reached the output"
    assert torch.equal(out, out0), "the output depends on what absent rows hold"
    for i, (g, g0) in enumerate(zip(gp, gp0)):
        assert torch.isfinite(g).all(), f"an absent row reached the gradient of parameter {i}"
        assert torch.equal(g, g0), f"the gradient of parameter {i} depends on absent rows"
    for k, (g, g0) in enumerate(zip(gx, gx0)):
        keep = sample_mask[:, k]
        assert torch.isfinite(g).all(), f"xs[{k}]'s gradient is not finite"
        assert torch.equal(g[keep], g0[keep]), f"xs[{k}]'s present rows depend on absent rows"
        assert torch.equal(g[~keep], torch.zeros_like(g[~keep])), (
            f"xs[{k}]'s absent rows got a nonzero gradient"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["concat_project", "project_concat"])
@pytest.mark.parametrize("impl", [mmkernels, reference], ids=["mmkernels", "reference"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_absent_rows_reach_nothing(device: str, op: str, impl, data) -> None:
    check(data.draw(poisoned_problems(op, device)), impl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["concat_project", "project_concat"])
@pytest.mark.parametrize("present", [0.5, 0.9], ids=["gathered", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_rows_on_each_side_of_the_gather_threshold(device, op, present, dtype) -> None:
    """The two engine paths by name, with per-subset weights and a subset_mask."""
    widths = [8] if op == "concat_project" else [3, 4, 5]
    problem = Problem(op, [5, 7, 3], 60, widths, 4, True, 1.0, True, "relu", dtype, 11, device)
    check(Poisoned(problem, [round(present * 60)] * 3, [math.nan, math.inf]), mmkernels)
