"""Property tests: both fused ops, forward and every gradient, against the plain-PyTorch
reference over random shapes, masks, subsets, weight layouts, dtypes and activations."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import assert_matches_oracle

import mmkernels
from mmkernels import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@dataclass
class Problem:
    op: str  # "concat_project" or "project_concat"
    dims: list[int]
    batch: int
    widths: list[int]  # [H] for concat_project, [H_k] for project_concat
    num_subsets: int | None  # None: no subset_mask
    per_subset: bool
    sample_present: float | None  # None: no sample_mask
    bias: bool
    activation: str
    dtype: torch.dtype
    seed: int
    device: str = "cpu"

    def tensors(self):
        """Fresh random inputs in self.dtype (bfloat16 values are exactly representable)."""
        gen = torch.Generator().manual_seed(self.seed)
        K = len(self.dims)

        def rand(*shape):
            t = torch.randn(*shape, generator=gen, dtype=torch.float64)
            return t.to(device=self.device, dtype=self.dtype)

        xs = [rand(self.batch, d) for d in self.dims]
        lead = [self.num_subsets] if self.per_subset else []
        if self.op == "concat_project":
            weights = [rand(*lead, self.widths[0], sum(self.dims)) / sum(self.dims) ** 0.5]
            biases = [rand(*lead, self.widths[0])] if self.bias else []
        else:
            weights = [rand(*lead, h, d) / d**0.5 for h, d in zip(self.widths, self.dims)]
            biases = [rand(*lead, h) for h in self.widths] if self.bias else []
        subset_mask = None
        if self.num_subsets is not None:
            subset_mask = (torch.rand(self.num_subsets, K, generator=gen) < 0.6).to(self.device)
        sample_mask = None
        if self.sample_present is not None:
            sample_mask = torch.rand(self.batch, K, generator=gen) < self.sample_present
            sample_mask = sample_mask.to(self.device)
        return xs, weights, biases, subset_mask, sample_mask


@st.composite
def problems(draw, op: str, device: str = "cpu", dtypes=tuple(DTYPES)) -> Problem:
    K = draw(st.integers(1, 6))
    dims = draw(st.lists(st.integers(1, 24), min_size=K, max_size=K))
    layout = draw(st.sampled_from(["plain", "shared_subsets", "per_subset"]))
    num_subsets = None if layout == "plain" else draw(st.integers(1, min(2**K, 9)))
    if op == "concat_project":
        widths = [draw(st.integers(1, 20))]
    else:
        widths = draw(st.lists(st.integers(1, 12), min_size=K, max_size=K))
    return Problem(
        op=op,
        dims=dims,
        batch=draw(st.sampled_from([0, 1, 2, 5, 17, 64, 130])),
        widths=widths,
        num_subsets=num_subsets,
        per_subset=layout == "per_subset",
        sample_present=draw(st.sampled_from([None, 0.0, 0.3, 0.7, 1.0])),
        bias=draw(st.booleans()),
        activation=draw(st.sampled_from(["relu", "none"])),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
        device=device,
    )


def call(problem: Problem, impl, xs, weights, biases, subset_mask, sample_mask, activation):
    kwargs = dict(subset_mask=subset_mask, sample_mask=sample_mask, activation=activation)
    if problem.op == "concat_project":
        return impl.concat_project(xs, weights[0], biases[0] if biases else None, **kwargs)
    return impl.project_concat(xs, weights, biases if biases else None, **kwargs)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=False)


def check(problem: Problem) -> None:
    xs, weights, biases, subset_mask, sample_mask = problem.tensors()
    masks = (subset_mask, sample_mask)

    def leaves(dtype):
        return [t.detach().to(dtype).requires_grad_(True) for t in (*xs, *weights, *biases)]

    def split(ts):
        K, W = len(xs), len(weights)
        return ts[:K], ts[K : K + W], ts[K + W :]

    ours_in = leaves(problem.dtype)
    out = call(problem, mmkernels, *split(ours_in), *masks, problem.activation)
    same_in, oracle_in = leaves(problem.dtype), leaves(torch.float64)
    same = call(problem, reference, *split(same_in), *masks, problem.activation)
    oracle = call(problem, reference, *split(oracle_in), *masks, problem.activation)
    # The longest sum behind any output or gradient element.
    reduction = max(
        sum(problem.dims),
        problem.batch * (problem.num_subsets or 1),
        sum(problem.widths) * (problem.num_subsets or 1),
    )
    assert_matches_oracle(out, same, oracle, "forward", reduction)

    # The ReLU's kink is where rounding can flip a unit on or off; take the pattern from our
    # forward so every implementation differentiates the same piecewise-linear function.
    grad_out = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(problem.seed + 1), dtype=torch.float64
    ).to(device=problem.device, dtype=problem.dtype)
    effective = grad_out * (out > 0) if problem.activation == "relu" else grad_out
    ours_g = grads(out, ours_in, grad_out)
    same_g = grads(call(problem, reference, *split(same_in), *masks, "none"), same_in, effective)
    oracle_g = grads(
        call(problem, reference, *split(oracle_in), *masks, "none"), oracle_in, effective.double()
    )
    for i, (a, b, c) in enumerate(zip(ours_g, same_g, oracle_g)):
        assert_matches_oracle(a, b, c, f"gradient of input {i}", reduction)


@settings(max_examples=250, deadline=None)
@given(problems("concat_project"))
def test_concat_project_matches_reference(problem: Problem) -> None:
    check(problem)


@settings(max_examples=250, deadline=None)
@given(problems("project_concat"))
def test_project_concat_matches_reference(problem: Problem) -> None:
    check(problem)


@pytest.mark.parametrize("op", ["concat_project", "project_concat"])
def test_absent_rows_never_reach_the_output(op: str) -> None:
    """Whatever an absent row holds (here NaN) cannot change the forward result."""
    problem = Problem(
        op,
        [4, 6, 3],
        9,
        [5] if op == "concat_project" else [2, 3, 4],
        4,
        True,
        0.5,
        True,
        "relu",
        torch.float32,
        7,
    )
    xs, weights, biases, subset_mask, sample_mask = problem.tensors()
    poisoned = [torch.where(sample_mask[:, k : k + 1], x, torch.nan) for k, x in enumerate(xs)]
    clean = [torch.where(sample_mask[:, k : k + 1], x, 0.0) for k, x in enumerate(xs)]
    a = call(problem, mmkernels, poisoned, weights, biases, subset_mask, sample_mask, "relu")
    b = call(problem, mmkernels, clean, weights, biases, subset_mask, sample_mask, "relu")
    assert torch.equal(a, b)


def test_row_with_every_modality_absent() -> None:
    """concat_project gives act(bias) there; project_concat gives zeros."""
    xs = [torch.randn(3, 4), torch.randn(3, 2)]
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    bias = torch.randn(5)
    out = mmkernels.concat_project(xs, torch.randn(5, 6), bias, sample_mask=mask, activation="none")
    assert torch.equal(out[1], bias)
    late = mmkernels.project_concat(
        xs,
        [torch.randn(3, 4), torch.randn(2, 2)],
        [torch.randn(3), torch.randn(2)],
        sample_mask=mask,
    )
    assert torch.equal(late[1], torch.zeros(5))
    assert torch.equal(late[2, 3:], torch.zeros(2))


def test_empty_batch_gives_empty_result_and_zero_weight_grads() -> None:
    xs = [torch.randn(0, 3, requires_grad=True), torch.randn(0, 2, requires_grad=True)]
    w = torch.randn(4, 5, requires_grad=True)
    out = mmkernels.concat_project(xs, w, subset_mask=torch.ones(3, 2, dtype=torch.bool))
    assert out.shape == (3, 0, 4)
    (gw,) = torch.autograd.grad(out.sum(), [w])
    assert torch.equal(gw, torch.zeros_like(w))
