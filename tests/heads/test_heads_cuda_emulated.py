"""The CUDA kernels of the head-refit ops (csrc/cuda/gram.cuh, softmax_regression.cuh) run
through the host emulator (no GPU) against plain PyTorch in float64 and in the accumulation
dtype (tests/oracle.py's rule): shapes with tails across the kernels' tiles (64-wide Gram
tiles, 32-column Z stages, 32-row softmax tiles), strided z, several batch splits, every
dtype; outputs poisoned beforehand and every element checked. The same kernels on a GPU:
tests/heads/test_heads_cuda.py."""

from __future__ import annotations

import cuda_emulator as emu
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import assert_matches_oracle

from mmkernels import reference

ACC = {torch.float32: torch.float32, torch.bfloat16: torch.float32, torch.float64: torch.float64}


def _z(gen: torch.Generator, S: int, n: int, H: int, dtype: torch.dtype, layout: str):
    """z [S, n, H] in one of three layouts: contiguous, a column slice of a wider tensor (odd
    row stride), or n-major storage (subset stride smaller than the row stride)."""
    if layout == "sliced":
        return torch.randn(S, n, H + 3, generator=gen, dtype=torch.float64).to(dtype)[:, :, 1:H + 1]
    if layout == "n_major":
        return torch.randn(n, S, H, generator=gen, dtype=torch.float64).to(dtype).transpose(0, 1)
    return torch.randn(S, n, H, generator=gen, dtype=torch.float64).to(dtype)


def _gram_reference(z: torch.Tensor, y2: torch.Tensor, dtype: torch.dtype):
    return reference.gram(z.to(dtype), y2)


@st.composite
def gram_cases(draw):
    return dict(
        S=draw(st.integers(0, 3)),
        n=draw(st.sampled_from([0, 1, 31, 33, 100, 257])),
        H=draw(st.sampled_from([0, 1, 5, 62, 63, 64, 70, 130])),
        T=draw(st.sampled_from([None, 1, 3])),
        dtype=draw(st.sampled_from(list(ACC))),
        layout=draw(st.sampled_from(["contiguous", "sliced", "n_major"])),
        num_sms=draw(st.sampled_from([1, 4, 132])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=30, deadline=None)
@given(gram_cases())
def test_gram_kernels_match_reference(case) -> None:
    gen = torch.Generator().manual_seed(case["seed"])
    S, n, H, T, dtype = case["S"], case["n"], case["H"], case["T"], case["dtype"]
    z = _z(gen, S, n, H, dtype, case["layout"])
    y = torch.randn(n, *([] if T is None else [T]), generator=gen, dtype=torch.float64)
    y = y.to(ACC[dtype])
    G, R = emu.run_gram(z, y, num_sms=case["num_sms"])
    y2 = y.unsqueeze(1) if y.dim() == 1 else y
    acc = ACC[dtype]
    same = _gram_reference(z, y2, acc)
    oracle = _gram_reference(z.double(), y2.double(), torch.float64)
    for name, ours, s, o in zip(("G", "R"), (G, R), same, oracle, strict=True):
        assert ours.dtype == acc
        assert_matches_oracle(ours, s, o, f"gram {name} (emulated)", max(n, 1))
    assert torch.equal(G, G.transpose(1, 2)), "G is not exactly symmetric"
    assert (G[:, H, H] == n).all()


def test_gram_does_not_depend_on_timing_only_on_the_split() -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 300, 70, generator=gen)
    y = torch.randn(300, 2, generator=gen)
    first, again = emu.run_gram(z, y, num_sms=8), emu.run_gram(z, y, num_sms=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def _softmax_reference(z, y, w, b, sw, l2, index, dtype):
    """mmkernels.reference's op with every floating input in `dtype`."""
    return reference.softmax_regression_loss_grad(
        z.to(dtype), y, w.to(dtype), b.to(dtype), None if sw is None else sw.to(dtype), l2,
        index)


@st.composite
def softmax_cases(draw):
    S = draw(st.integers(1, 3))
    return dict(
        S=S,
        n=draw(st.sampled_from([0, 1, 31, 33, 100, 257])),
        H=draw(st.sampled_from([0, 1, 5, 31, 32, 33, 70])),
        C=draw(st.sampled_from([1, 2, 10, 31, 33, 40])),
        dtypes=draw(st.sampled_from([(torch.float32, torch.float32),
                                     (torch.bfloat16, torch.float32),
                                     (torch.float64, torch.float64)])),
        layout=draw(st.sampled_from(["contiguous", "sliced", "n_major"])),
        pick=draw(st.none() | st.lists(st.integers(0, S - 1), min_size=0, max_size=4)),
        weighted=draw(st.booleans()),
        l2=draw(st.sampled_from([0.0, 0.7])),
        num_sms=draw(st.sampled_from([1, 4, 132])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _softmax_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    S, n, H, C = case["S"], case["n"], case["H"], case["C"]
    zdt, acc = case["dtypes"]
    z = _z(gen, S, n, H, zdt, case["layout"])
    index = None if case["pick"] is None else torch.tensor(case["pick"], dtype=torch.int64)
    K = S if index is None else len(index)
    y = torch.randint(0, C, (n,), generator=gen)
    w = (0.3 * torch.randn(K, H, C, generator=gen, dtype=torch.float64)).to(acc)
    b = torch.randn(K, C, generator=gen, dtype=torch.float64).to(acc)
    sw = torch.rand(n, generator=gen, dtype=torch.float64).to(acc) if case["weighted"] else None
    return z, y, w, b, sw, index


@settings(max_examples=30, deadline=None)
@given(softmax_cases())
def test_softmax_kernels_match_reference(case) -> None:
    check_softmax(case)


def check_softmax(case) -> None:
    z, y, w, b, sw, index = _softmax_inputs(case)
    acc = w.dtype
    got = emu.run_softmax(z, y, w, b, sw, case["l2"], index, num_sms=case["num_sms"])
    same = _softmax_reference(z, y, w, b, sw, case["l2"], index, acc)
    oracle = _softmax_reference(z.double(), y, w, b, sw, case["l2"], index, torch.float64)
    reduction = max(case["n"], case["H"], case["C"], 1)
    for name, ours, s, o in zip(("loss", "grad_w", "grad_b"), got, same, oracle, strict=True):
        assert_matches_oracle(ours, s, o, f"softmax {name} (emulated)", reduction)


def test_softmax_many_classes_use_smaller_row_tiles() -> None:
    """C = 400 in float32 and 200 in float64: the logits of 32 rows no longer fit, the kernel
    takes 16 or 8 rows per tile."""
    for zdt, acc, C in ((torch.float32, torch.float32, 400), (torch.float64, torch.float64, 200)):
        case = dict(S=2, n=70, H=40, C=C, dtypes=(zdt, acc), layout="contiguous", pick=[1],
                    weighted=True, l2=0.3, num_sms=4, seed=1)
        check_softmax(case)


def test_softmax_refuses_more_classes_than_shared_memory_holds() -> None:
    z, y = torch.randn(1, 3, 2), torch.zeros(3, dtype=torch.int64)
    w, b = torch.zeros(1, 2, 20000), torch.zeros(1, 20000)
    with pytest.raises(emu.EmulatorError, match="classes is more than the CUDA kernel's"):
        emu.run_softmax(z, y, w, b, None, 0.0)


def test_softmax_nan_in_one_subset_reaches_only_its_loss() -> None:
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 80, 9, generator=gen)
    z[1, 40, 3] = float("nan")
    y = torch.randint(0, 4, (80,), generator=gen)
    w, b = 0.1 * torch.randn(3, 9, 4, generator=gen), torch.randn(3, 4, generator=gen)
    loss, gw, gb = emu.run_softmax(z, y, w, b, None, 0.1)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isfinite(gw[[0, 2]]).all() and torch.isfinite(gb[[0, 2]]).all()


def test_softmax_out_of_range_values_give_nan_not_a_wild_read() -> None:
    """The CUDA kernels cannot raise on bad labels or subset indices without a host sync:
    the problems they touch get NaN (a label: every problem; an index: its own)."""
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(2, 50, 5, generator=gen)
    y = torch.randint(0, 3, (50,), generator=gen)
    w, b = torch.zeros(3, 5, 3), torch.zeros(3, 3)
    loss, gw, _ = emu.run_softmax(z, y, w, b, None, 0.0, torch.tensor([0, 7, -1]))
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    assert torch.isnan(gw[1:]).all() and torch.isfinite(gw[0]).all()
    y[10] = 3
    loss, _, _ = emu.run_softmax(z, y, w[:2], b[:2], None, 0.0)
    assert torch.isnan(loss).all()


def test_softmax_is_deterministic() -> None:
    case = dict(S=2, n=257, H=70, C=10, dtypes=(torch.bfloat16, torch.float32),
                layout="sliced", pick=[1, 0, 1], weighted=True, l2=0.5, num_sms=8, seed=2)
    z, y, w, b, sw, index = _softmax_inputs(case)
    first = emu.run_softmax(z, y, w, b, sw, 0.5, index, num_sms=8)
    again = emu.run_softmax(z, y, w, b, sw, 0.5, index, num_sms=8)
    assert all(torch.equal(a, c) for a, c in zip(first, again, strict=True))


# ---- lbfgs_direction -----------------------------------------------------------------------------

LBFGS_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _lbfgs_inputs(seed: int, k: int, P: int, m: int, dtype: torch.dtype, with_diag: bool,
                  device: str = "cpu"):
    """grad, s, y, rho, gamma, diag as an L-BFGS solver holds them: y = A s with a positive
    diagonal A per pair (so s'y > 0) and rho = 1 / s'y; pair 1 of problem 0 is a rejected
    one (rho = 0)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    s = [randn(k, P) for _ in range(m)]
    y = [(0.5 + 1.5 * rand(k, P)) * sj for sj in s]
    rho = [1 / torch.linalg.vecdot(sj, yj).clamp_min(1e-12) for sj, yj in zip(s, y, strict=True)]
    if m > 1 and k > 0:
        rho[1][0] = 0.0
    gamma = 0.5 + rand(k)
    diag = 0.5 + rand(k, P) if with_diag else None
    args = (randn(k, P), s, y, rho, gamma, diag)

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return tuple([cast(t) for t in a] if isinstance(a, list) else cast(a) for a in args)


def assert_lbfgs_matches_reference(got: torch.Tensor, args, what: str) -> None:
    """Against the float64 reference, within the dtype's tolerance at the result's scale."""
    grad = args[0]
    assert got.shape == grad.shape and got.dtype == grad.dtype, what
    oracle = reference.lbfgs_direction(*(
        [t.cpu().double() for t in a] if isinstance(a, list)
        else None if a is None else a.cpu().double() for a in args))
    if oracle.numel() == 0:
        return
    scale = max(oracle.abs().max().item(), 1.0)
    err = (got.cpu().double() - oracle).abs().max().item()
    assert err <= LBFGS_RTOL[grad.dtype] * scale, (
        f"{what}: max error {err:.3g} against float64 at scale {scale:.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("with_diag", [False, True], ids=["identity", "diag"])
@pytest.mark.parametrize("k, P, m", [
    (1, 1, 0), (3, 70, 0), (1, 1, 3), (1, 300, 1), (3, 300, 3),
    (2, 1100, 3),  # past one batch of 4 x 256 elements
    (2, 70, 32),   # one launch, every pair
    (2, 70, 33),   # two: the first loop's newest 32, then the oldest pair's turn
    (3, 1, 40), (3, 257, 40),
    (2, 33, 70),   # three chunks: a forward and a backward stage that hold no end of grad/d
])
def test_lbfgs_direction_kernel_matches_reference(dtype, with_diag, k, P, m) -> None:
    args = _lbfgs_inputs(100 * k + P + m, k, P, m, dtype, with_diag)
    got = emu.run_lbfgs_direction(*args)
    assert_lbfgs_matches_reference(got, args, f"lbfgs_direction k={k} P={P} m={m} (emulated)")


def test_lbfgs_direction_rows_beyond_the_grid() -> None:
    """num_sms = 1: 32 blocks for 40 problems, the blocks loop over the rest."""
    args = _lbfgs_inputs(7, 40, 45, 5, torch.float64, True)
    got = emu.run_lbfgs_direction(*args, num_sms=1)
    assert_lbfgs_matches_reference(got, args, "lbfgs_direction, 40 rows on 32 blocks")
    assert torch.equal(got, emu.run_lbfgs_direction(*args, num_sms=8))


@pytest.mark.parametrize("m", [3, 40])  # one launch; several, the rows read in each
def test_lbfgs_direction_reads_each_problems_row_through_rows(m) -> None:
    """A history that kept the rows of problems since finished (7 rows, 4 problems left)."""
    grad, s, y, rho, gamma, diag = _lbfgs_inputs(11, 7, 70, m, torch.float64, True)
    gen = torch.Generator().manual_seed(m)
    rows = torch.stack([torch.randperm(7, generator=gen)[:4] for _ in range(m)])
    got = emu.run_lbfgs_direction(grad[:4], s, y, rho, gamma[:4], diag[:4], rows=rows)
    picked = [[t.index_select(0, r) for t, r in zip(ts, rows, strict=True)] for ts in (s, y, rho)]
    args = (grad[:4], *picked, gamma[:4], diag[:4])
    assert_lbfgs_matches_reference(got, args, f"lbfgs_direction with rows, m={m} (emulated)")
    # A row out of range cannot raise on the device: that problem's direction is NaN.
    rows[m - 1, 2] = 7
    got = emu.run_lbfgs_direction(grad[:4], s, y, rho, gamma[:4], diag[:4], rows=rows)
    assert torch.isnan(got[2]).all() and torch.isfinite(got[[0, 1, 3]]).all()


def test_lbfgs_direction_rejected_pairs_do_nothing() -> None:
    """rho = 0 on every pair (across launches too): exactly the scaled steepest descent."""
    for dtype in (torch.float32, torch.float64):
        grad, s, y, rho, gamma, diag = _lbfgs_inputs(8, 3, 50, 40, dtype, True)
        rho = [torch.zeros_like(r) for r in rho]
        got = emu.run_lbfgs_direction(grad, s, y, rho, gamma, diag)
        assert torch.equal(got, -(grad * gamma.unsqueeze(1) * diag))


@pytest.mark.parametrize("k, P", [(0, 5), (3, 0), (0, 0)])
def test_lbfgs_direction_empty(k, P) -> None:
    args = _lbfgs_inputs(9, k, P, 3, torch.float32, True)
    got = emu.run_lbfgs_direction(*args)
    assert got.shape == (k, P) and got.dtype == torch.float32


def test_lbfgs_direction_is_deterministic() -> None:
    args = _lbfgs_inputs(10, 3, 1000, 40, torch.float32, False)
    assert torch.equal(emu.run_lbfgs_direction(*args), emu.run_lbfgs_direction(*args))
