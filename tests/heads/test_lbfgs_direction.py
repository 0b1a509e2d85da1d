"""mmkernels::lbfgs_direction (the solvers' two-loop recursion) on the CPU: against the
plain-PyTorch recursion over random shapes, histories and dtypes, opcheck, torch.compile, the
argument checks, and the solver's results with it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmkernels  # noqa: F401  (registers the ops)
from mmkernels import heads, reference

ops = torch.ops.mmkernels


def _history(k: int, P: int, m: int, dtype: torch.dtype, seed: int, empty: int = -1):
    """A curvature-like history: y = s scaled per coordinate (s'y > 0), the pair `empty`
    stored as L-BFGS stores a rejected one (zeros, rho = 0)."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(k, P, generator=g, dtype=torch.float64)
    s = [torch.randn(k, P, generator=g, dtype=torch.float64) for _ in range(m)]
    y = [sj * (0.5 + torch.rand(k, P, generator=g, dtype=torch.float64)) for sj in s]
    rho = [1.0 / torch.linalg.vecdot(sj, yj) for sj, yj in zip(s, y, strict=True)]
    if 0 <= empty < m:
        s[empty], y[empty], rho[empty] = s[empty] * 0, y[empty] * 0, rho[empty] * 0
    gamma = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    diag = 0.1 + torch.rand(k, P, generator=g, dtype=torch.float64)
    cast = [t.to(dtype) for t in (grad, *s, *y, *rho, gamma, diag)]
    return cast[0], cast[1:1 + m], cast[1 + m:1 + 2 * m], cast[1 + 2 * m:1 + 3 * m], \
        cast[-2], cast[-1]


def _close(got: torch.Tensor, want: torch.Tensor, m: int, P: int) -> None:
    """Within the rounding of 2 m + 1 dot products and updates of length P in got's dtype."""
    if want.numel() == 0:
        return
    eps = torch.finfo(got.dtype).eps
    tol = 4 * eps * (2 * m + 1) * P ** 0.5 * float(want.abs().max().clamp_min(1e-30))
    err = float((got.double() - want).abs().max())
    assert err <= tol, (err, tol)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 6), P=st.integers(1, 70), m=st.integers(0, 12),
       dtype=st.sampled_from([torch.float32, torch.float64]), with_diag=st.booleans(),
       empty=st.integers(-1, 12), seed=st.integers(0, 2**31 - 1))
def test_matches_the_recursion_in_float64(k, P, m, dtype, with_diag, empty, seed):
    grad, s, y, rho, gamma, diag = _history(k, P, m, dtype, seed, empty)
    diag = diag if with_diag else None
    got = ops.lbfgs_direction(grad, s, y, rho, gamma, diag)
    assert got.shape == (k, P) and got.dtype == dtype
    f64 = [[t.double() for t in ts] for ts in (s, y, rho)]
    want = reference.lbfgs_direction(grad.double(), *f64, gamma.double(),
                                     None if diag is None else diag.double())
    _close(got, want, m, P)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 5), P=st.integers(1, 40), m=st.integers(0, 6),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_rows_pick_each_problems_row_of_each_pair(k, P, m, dtype, seed):
    """A history that kept rows of problems since finished: pair j holds n_j >= k rows."""
    g = torch.Generator().manual_seed(seed)
    grad, s, y, rho, gamma, diag = _history(k + 3, P, m, dtype, seed)
    rows = torch.stack([torch.randperm(k + 3, generator=g)[:k] for _ in range(m)]) if m else \
        torch.zeros(0, k, dtype=torch.int64)
    got = ops.lbfgs_direction(grad[:k], s, y, rho, gamma[:k], diag[:k], rows)
    picked = [[t.index_select(0, r) for t, r in zip(ts, rows, strict=True)] for ts in (s, y, rho)]
    assert torch.equal(got, ops.lbfgs_direction(grad[:k], *picked, gamma[:k], diag[:k]))
    f64 = [[t.double() for t in ts] for ts in picked]
    _close(got, reference.lbfgs_direction(grad[:k].double(), *f64, gamma[:k].double(),
                                          diag[:k].double()), m, P)


def test_a_long_row_uses_every_vector_lane_and_the_tail():
    # P = 5130 (H = 512, C = 10): the vector loops and a tail of 2 in float64, 10 in float32.
    for dtype in (torch.float32, torch.float64):
        grad, s, y, rho, gamma, diag = _history(3, 5130, 10, dtype, 7)
        got = ops.lbfgs_direction(grad, s, y, rho, gamma, diag)
        f64 = [[t.double() for t in ts] for ts in (s, y, rho)]
        _close(got, reference.lbfgs_direction(grad.double(), *f64, gamma.double(),
                                              diag.double()), 10, 5130)


def test_strided_inputs_read_as_their_values():
    grad, s, y, rho, gamma, diag = _history(4, 9, 3, torch.float64, 3)
    t = [x.t().contiguous().t() for x in (grad, *s, *y, diag)]  # column-major copies
    got = ops.lbfgs_direction(t[0], t[1:4], t[4:7], rho, gamma, t[7])
    assert torch.equal(got, ops.lbfgs_direction(grad, s, y, rho, gamma, diag))


def test_threads_split_the_problems_without_changing_a_bit():
    grad, s, y, rho, gamma, diag = _history(40, 2000, 4, torch.float64, 5)  # k P > the grain
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.lbfgs_direction(grad, s, y, rho, gamma, diag)
        torch.set_num_threads(2)
        two = ops.lbfgs_direction(grad, s, y, rho, gamma, diag)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m, with_diag", [(0, False), (3, True), (2, False)])
def test_opcheck(dtype, m, with_diag):
    grad, s, y, rho, gamma, diag = _history(3, 11, m, dtype, 11)
    torch.library.opcheck(ops.lbfgs_direction,
                          (grad, s, y, rho, gamma, diag if with_diag else None))


def test_compiles_fullgraph():
    grad, s, y, rho, gamma, diag = _history(2, 13, 3, torch.float64, 2)
    f = torch.compile(lambda *a: ops.lbfgs_direction(*a) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(grad, s, y, rho, gamma, diag),
                       ops.lbfgs_direction(grad, s, y, rho, gamma, diag) * 2)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_arguments_name_the_argument(device):
    grad, s, y, rho, gamma, diag = (x.to(device) if isinstance(x, torch.Tensor)
                                    else [t.to(device) for t in x]
                                    for x in _history(3, 5, 2, torch.float64, 1))
    rows = torch.tensor([[0, 1, 2], [2, 1, 0]], device=device)
    cases = [
        ((grad[0], s, y, rho, gamma, diag), "grad must be 2-d"),
        ((grad.long(), s, y, rho, gamma, diag), "grad must be float32 or float64"),
        ((grad, s, y[:1], rho, gamma, diag), "one tensor per stored pair"),
        ((grad, [s[0], s[1][:, :4]], y, rho, gamma, diag), r"s\[1\] must have shape \[3, 5\]"),
        ((grad, s, [y[0].float(), y[1]], rho, gamma, diag), r"y\[0\] has dtype Float"),
        ((grad, s, y, [rho[0], rho[1][:2]], gamma, diag), r"rho\[1\] must have shape \[3\]"),
        ((grad, s, y, rho, gamma[:, None], diag), "gamma must have shape"),
        ((grad, s, y, rho, gamma, diag[:2]), "diag must have shape"),
        ((grad, s, y, rho, gamma, diag, rows.int()), "rows must be int64"),
        ((grad, s, y, rho, gamma, diag, rows[:1]), r"rows must have shape \[2, 3\]"),
        ((grad, [s[0][:2], s[1]], y, rho, gamma, diag, rows), r"y\[0\] must have shape \[2, 5\]"),
    ]
    if device == "cpu":  # the range is the CPU kernel's check: it reads the rows
        cases.append(((grad, s, y, rho, gamma, diag, rows + 1), r"rows\[0\] must hold rows of s"))
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.lbfgs_direction(*args)


def test_cpu_shortcuts_leave_the_solution_unchanged(monkeypatch):
    """On the CPU the solver reads two flags to skip rarely needed work (the steepest-descent
    restart, the zeroing of rejected pairs); computing both always, as on a GPU, gives the same
    bits."""
    g = torch.Generator().manual_seed(4)
    z = torch.relu(torch.randn(3, 200, 6, generator=g))
    y = (z[0, :, 0] + z[1, :, 1] - z[2, :, 2] > 0.4).long() + (z[0, :, 3] > 1).long()
    fast = heads.fit(z, y, task="classification", l2=0.1)
    monkeypatch.setattr(heads, "_reads_are_free", lambda device: False)
    always = heads.fit(z, y, task="classification", l2=0.1)
    assert torch.equal(fast.coef, always.coef) and torch.equal(fast.intercept, always.intercept)
    assert torch.equal(fast.n_iter, always.n_iter) and int(fast.n_iter.min()) > 3
