"""The CPU engine's blocked GEMMs (csrc/cpu/blocked_gemm.h: bfloat16 on AMX with float32
results, and float32, on oneDNN's ukernels) where the CPU has AMX, and the MKL path elsewhere
(bfloat16 converted to float32), forced here by disabling oneDNN (torch.backends.mkldnn), as on
a CPU without AMX.

The hypothesis parity tests (test_fused_ops_parity.py) draw shapes that fit one block of the
blocked loops; the problems here cross every block boundary: rows past one row block and one
task (64 and 512 rows) and past the backward's depth block (256), widths past one column block
(64), odd widths (padded depth in bfloat16), gathered and dense modalities.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from oracle import assert_matches_oracle
from test_fused_ops_parity import Problem, call, check, problems

import mmkernels
from mmkernels import reference
from mmkernels._native import native


def cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any("amx_bf16" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


@contextmanager
def onednn(enabled: bool):
    """torch.backends.mkldnn.enabled for the block (its flags() also sets TF32 and warns)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def test_blocked_path_follows_the_cpu_and_the_onednn_switch() -> None:
    assert native().blocked_gemms() == cpu_has_amx_bf16()
    with onednn(False):
        assert not native().blocked_gemms()


def big(
    op: str, present: float | None, per_subset: bool, dims: list[int], seed: int,
    dtype: torch.dtype = torch.bfloat16, widths: list[int] | None = None, num_subsets: int = 3,
) -> Problem:
    if widths is None:
        widths = [70] if op == "concat_project" else [70, 33, 130][: len(dims)]
    return Problem(
        op=op,
        dims=dims,
        batch=1100,
        widths=widths,
        num_subsets=num_subsets if per_subset else None,
        per_subset=per_subset,
        sample_present=present,
        bias=True,
        activation="relu",
        dtype=dtype,
        seed=seed,
    )


# present 0.5: gathered; 0.9: dense with absent rows; None: no mask.
LARGE = [
    (op, present, per_subset, dims)
    for op in ["concat_project", "project_concat"]
    for present in [0.5, 0.9, None]
    for per_subset in [False, True]
    for dims in [[3, 67, 130]]
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "mkl"])
@pytest.mark.parametrize("op,present,per_subset,dims", LARGE)
def test_large_problems_match_the_reference(op, present, per_subset, dims, blocked, dtype) -> None:
    seed = len(dims) + int(10 * (present or 0))
    with onednn(blocked):
        check(big(op, present, per_subset, dims, seed, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("present", [0.5, 0.9, None])
@pytest.mark.parametrize("widths", [[200, 150, 170], [100, 90, 120]], ids=["groups", "bands"])
def test_wide_project_concat_builds_r_by_column_groups(widths, present, dtype) -> None:
    """R_k wider than the backward's default band buffers (8 subsets). groups: widths 200 /
    150 / 170, 600-850 columns a modality, past the 512-column groups and the 1 MiB of rows
    built ahead: each modality's pass builds R_k from grad_out and out a column group at a
    time. bands: 1,700 columns in all, built ahead in bands of 128 rows instead of 256."""
    problem = big("project_concat", present, True, [3, 67, 130], seed=8, dtype=dtype,
                  widths=widths, num_subsets=8)
    xs, weights, biases, subset_mask, sample_mask = problem.tensors()
    cols = [n * w for n, w in zip(subset_mask.sum(0).tolist(), widths)]
    if widths[0] == 200:
        assert min(cols) > 512 and sum(cols) > 2048, cols
    else:
        assert 1024 < sum(cols) <= 2048, cols
    check(problem)
    # Normwise too: at this size the elementwise bound above allows errors of the order of the
    # results in bfloat16 (8 eps sqrt(8,800)). Inputs are exact in the dtype and sums run in
    # float32, so each result is off by its final rounding (relative 2^-9 in bfloat16) plus the
    # float32 rounding of sums of up to 1,100 terms (random: ~eps_32 sqrt(n)).
    leaves = [t.detach().requires_grad_(True) for t in (*xs, *weights, *biases)]
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    K = len(xs)
    out = mmkernels.project_concat(leaves[:K], leaves[K:2 * K], leaves[2 * K:],
                                   subset_mask=subset_mask, sample_mask=sample_mask)
    out64 = reference.project_concat(leaves64[:K], leaves64[K:2 * K], leaves64[2 * K:],
                                     subset_mask=subset_mask, sample_mask=sample_mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad_out = grad_out * (out > 0)  # the same ReLU pattern for both
    ours = [out, *torch.autograd.grad(out, leaves, grad_out)]
    exact = [out64, *torch.autograd.grad(out64, leaves64, grad_out.double() * (out64 > 0))]
    for i, (a, e) in enumerate(zip(ours, exact)):
        rel = ((a.double() - e).norm() / e.norm().clamp_min(1e-300)).item()
        bound = 4 * torch.finfo(dtype).eps + 4 * torch.finfo(torch.float32).eps * 1100 ** 0.5
        assert rel <= bound, f"result {i}: normwise relative error {rel:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "mkl"])
@pytest.mark.parametrize("dims", [[0], [0, 3]], ids=["only", "beside"])
def test_a_modality_without_features(dims, blocked, dtype) -> None:
    """d_k = 0: its products are empty sums (zeros), not a GEMM of empty depth, which the
    ukernel refuses (it raised std::bad_alloc)."""
    xs = [torch.randn(600, d, dtype=dtype, requires_grad=True) for d in dims]
    w = torch.randn(70, sum(dims), dtype=dtype, requires_grad=True)
    b = torch.randn(70, dtype=dtype, requires_grad=True)
    with onednn(blocked):
        out = mmkernels.concat_project(xs, w, b)
        grads = torch.autograd.grad(out, [*xs, w, b], torch.ones_like(out))
    same = reference.concat_project(xs, w, b)
    grads_same = torch.autograd.grad(same, [*xs, w, b], torch.ones_like(same))
    leaves64 = [t.detach().double().requires_grad_(True) for t in (*xs, w, b)]
    oracle = reference.concat_project(leaves64[: len(xs)], leaves64[-2], leaves64[-1])
    grads64 = torch.autograd.grad(oracle, leaves64, torch.ones_like(oracle))
    assert_matches_oracle(out, same, oracle, "out", reduction=sum(dims) + 1)
    for i, (g, gs, g64) in enumerate(zip(grads, grads_same, grads64)):
        assert_matches_oracle(g, gs, g64, f"gradient {i}", reduction=600)


@settings(max_examples=60, deadline=None)
@given(problems("concat_project", dtypes=(torch.bfloat16,)))
def test_concat_project_fallback_matches_reference(problem: Problem) -> None:
    with onednn(False):
        check(problem)


@settings(max_examples=60, deadline=None)
@given(problems("project_concat", dtypes=(torch.bfloat16,)))
def test_project_concat_fallback_matches_reference(problem: Problem) -> None:
    with onednn(False):
        check(problem)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("op", ["concat_project", "project_concat"])
@pytest.mark.parametrize("present", [0.5, 0.9])
def test_nan_in_absent_rows_reaches_no_result_or_gradient(op, present, dtype) -> None:
    """On the blocked path too: absent rows holding NaN give the results and gradients of
    absent rows holding zeros, and zero gradients of their own."""
    problem = big(op, present, per_subset=True, dims=[3, 67, 130], seed=3, dtype=dtype)
    xs, weights, biases, subset_mask, sample_mask = problem.tensors()

    def run(fill: float):
        leaves = [
            torch.where(sample_mask[:, k : k + 1], x, fill).requires_grad_(True)
            for k, x in enumerate(xs)
        ]
        params = [t.detach().requires_grad_(True) for t in (*weights, *biases)]
        ws, bs = params[: len(weights)], params[len(weights) :]
        out = call(problem, mmkernels, leaves, ws, bs, subset_mask, sample_mask, "relu")
        grads = torch.autograd.grad(out, [*leaves, *params], torch.ones_like(out))
        return out, grads

    out_nan, grads_nan = run(float("nan"))
    out_zero, grads_zero = run(0.0)
    assert torch.equal(out_nan, out_zero)
    for k, (a, b) in enumerate(zip(grads_nan, grads_zero)):
        assert torch.equal(a, b), f"gradient {k}"
    for k in range(len(xs)):
        absent = ~sample_mask[:, k]
        assert torch.equal(grads_nan[k][absent], torch.zeros_like(grads_nan[k][absent]))
