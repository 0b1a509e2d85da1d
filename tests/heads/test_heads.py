"""mmkernels.heads and its native ops: agreement with scikit-learn, degenerate inputs, opcheck,
and the message of every invalid-argument class."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression, Ridge

import mmkernels  # noqa: F401  (registers the ops)
from mmkernels import heads, reference

ops = torch.ops.mmkernels
FAST = settings(max_examples=8, deadline=None)


def _objective(z: torch.Tensor, y: torch.Tensor, W, b, l2: float, sw=None) -> torch.Tensor:
    loss, _, _ = ops.softmax_regression_loss_grad(z, y, W.to(z.dtype), b.to(z.dtype), sw, l2)
    return loss.double()


# ---- agreement with scikit-learn ---------------------------------------------------------------


@FAST
@given(S=st.integers(1, 3), n=st.integers(4, 50), H=st.integers(1, 6), T=st.integers(1, 3),
       alpha=st.floats(1e-3, 10.0), shift=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_ridge_matches_sklearn(S, n, H, T, alpha, shift, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(S, n, H, generator=g, dtype=torch.float64) + shift
    y = torch.randn(n, T, generator=g, dtype=torch.float64)
    h = heads.fit(z, y, task="regression", l2=alpha)
    risk = h.risk(z, y)
    for s in range(S):
        ref = Ridge(alpha=alpha, solver="cholesky").fit(z[s].numpy(), y.numpy())
        coef, icpt = ref.coef_.reshape(T, H).T, np.reshape(ref.intercept_, T)
        np.testing.assert_allclose(h.coef[s].numpy(), coef, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(h.intercept[s].numpy(), icpt, rtol=1e-7, atol=1e-9)
        mse = ((ref.predict(z[s].numpy()).reshape(n, T) - y.numpy()) ** 2).mean()
        assert abs(risk[s].item() - mse) <= 1e-9 * max(1.0, mse)


@FAST
@given(S=st.integers(1, 2), n=st.integers(20, 60), H=st.integers(1, 4), C=st.integers(2, 4),
       l2=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_softmax_matches_sklearn(S, n, H, C, l2, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    y[:C] = torch.arange(C)  # every class present, as sklearn needs
    z = torch.randn(S, n, H, generator=g, dtype=torch.float64) + 0.5 * y[None, :, None]
    h = heads.fit(z, y, task="classification", l2=l2, tol=1e-10)
    assert bool(h.converged.all())
    risk, acc = h.risk(z, y), h.accuracy(z, y)
    for s in range(S):
        # sklearn fits two classes as one binomial w (= W_1 - W_0 here); our symmetric
        # multinomial fit at l2 is that binomial fit at C = 2 / l2, and W = [-w/2, w/2].
        c_sk = (2.0 if C == 2 else 1.0) / l2
        ref = LogisticRegression(C=c_sk, tol=1e-12, max_iter=10_000).fit(z[s].numpy(),
                                                                         y.numpy())
        Wr, br = torch.tensor(ref.coef_.T).unsqueeze(0), torch.tensor(ref.intercept_)[None]
        if C == 2:
            Wr, br = torch.cat([-Wr / 2, Wr / 2], 2), torch.cat([-br / 2, br / 2], 1)
        ours = _objective(z[s:s + 1], y, h.coef[s:s + 1], h.intercept[s:s + 1], l2)
        theirs = _objective(z[s:s + 1], y, Wr, br, l2)
        # Same objective: ours is at least as low, and both agree to 1e-9 relative.
        assert ours.item() <= theirs.item() * (1 + 1e-12)
        assert abs(ours.item() - theirs.item()) <= 1e-9 * theirs.item()
        np.testing.assert_allclose(h.coef[s].numpy(), Wr[0].numpy(), atol=2e-5 * (1 + 1 / l2))
        np.testing.assert_allclose(h.intercept[s].numpy(), br[0].numpy(),
                                   atol=2e-5 * (1 + 1 / l2))
        p = ref.predict_proba(z[s].numpy())
        ce = -np.log(p[np.arange(n), y.numpy()]).mean()
        assert abs(risk[s].item() - ce) <= 1e-6
        assert abs(acc[s].item() - ref.score(z[s].numpy(), y.numpy())) <= 1.5 / n


def test_softmax_balanced_class_weight_matches_sklearn():
    g = torch.Generator().manual_seed(3)
    n, H = 90, 3
    y = torch.cat([torch.zeros(60), torch.ones(20), torch.full((10,), 2)]).long()
    z = torch.randn(1, n, H, generator=g, dtype=torch.float64) + y[None, :, None]
    h = heads.fit(z, y, task="classification", l2=0.5, class_weight="balanced", tol=1e-10)
    ref = LogisticRegression(C=2.0, class_weight="balanced", tol=1e-12,
                             max_iter=10_000).fit(z[0].numpy(), y.numpy())
    np.testing.assert_allclose(h.coef[0].numpy(), ref.coef_.T, atol=1e-4)
    # A tensor of per-class weights equal to "balanced" gives the same heads.
    cw = n / (3 * torch.bincount(y).double())
    h2 = heads.fit(z, y, task="classification", l2=0.5, class_weight=cw, tol=1e-10)
    torch.testing.assert_close(h2.coef, h.coef, atol=1e-8, rtol=0)


def test_multi_output_regression_and_shapes():
    z = torch.randn(2, 30, 4, dtype=torch.float64)
    y = torch.randn(30, 3, dtype=torch.float64)
    h = heads.fit(z, y, task="regression")
    assert h.coef.shape == (2, 4, 3) and h.intercept.shape == (2, 3)
    assert h.predict(z).shape == (2, 30, 3)
    h1 = heads.fit(z, y[:, 0], task="regression")
    assert h1.predict(z).shape == (2, 30)
    torch.testing.assert_close(h1.coef[..., 0], h.coef[..., 0])


def test_float32_and_bfloat16_gram_accumulate_in_float32():
    z = torch.randn(2, 500, 8)
    y = torch.randn(500, 1)
    G64, R64 = ops.gram(z.double(), y.double())
    for dt in (torch.float32, torch.bfloat16):
        G, R = ops.gram(z.to(dt), y.to(dt))
        assert G.dtype == torch.float32 and R.dtype == torch.float32
        G_ref, R_ref = ops.gram(z.to(dt).double(), y.to(dt).double())
        torch.testing.assert_close(G.double(), G_ref, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(R.double(), R_ref, rtol=1e-5, atol=1e-3)
    assert G64.dtype == torch.float64 and G64[0, 8, 8].item() == 500


def test_one_accumulation_rule_for_the_ops_and_the_solvers():
    # The C++ rule (accumulation.h), asked for by heads.py, is the dtype the Gram op returns.
    from mmkernels._native import native

    expected = {torch.float32: torch.float32, torch.bfloat16: torch.float32,
                torch.float16: torch.float32, torch.float64: torch.float64}
    for dt, acc in expected.items():
        assert native().accumulation_dtype(dt) == acc
        assert heads._compute_dtype(dt) == acc
        if dt != torch.float16:  # the head ops take float32, float64 and bfloat16 Z
            assert ops.gram(torch.randn(1, 3, 2).to(dt), torch.randn(3).to(dt))[0].dtype == acc
    fitted = heads.fit(torch.randn(2, 9, 3).bfloat16(), torch.arange(9) % 3,
                       task="classification")
    assert fitted.decision_function(torch.randn(2, 4, 3).bfloat16()).dtype == torch.float32


def test_bfloat16_z_fits_like_its_float32_upcast():
    z = torch.randn(3, 200, 6).bfloat16()
    y = (z[0, :, 0] > 0).long()
    torch.testing.assert_close(heads.fit(z, y, task="classification").coef,
                               heads.fit(z.float(), y, task="classification").coef)
    yr = z[1, :, 1].float()
    torch.testing.assert_close(heads.fit(z, yr, task="regression").coef,
                               heads.fit(z.double(), yr.double(), task="regression").coef,
                               rtol=1e-5, atol=1e-6)


# ---- streaming ---------------------------------------------------------------------------------


class _Recorder:
    """Encoder over a fixed Z: returns Z's rows for the chunk and records chunk sizes."""

    def __init__(self, z: torch.Tensor):
        self.z, self.sizes, self.start = z, [], 0

    def __call__(self, xs: list[torch.Tensor]) -> torch.Tensor:
        idx = xs[0][:, 0].long()
        self.sizes.append(len(idx))
        return self.z[:, idx]


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_streamed_fit_equals_tensor_fit_within_budget(task):
    g = torch.Generator().manual_seed(0)
    S, n, H = 3, 300, 5
    z = torch.randn(S, n, H, generator=g, dtype=torch.float64)
    y = (z[0, :, 0] > 0).long() if task == "classification" else z[2, :, 1].clone()
    xs = [torch.arange(n, dtype=torch.float64)[:, None]]
    enc = _Recorder(z)
    budget = 40 * S * H * 16  # a few dozen rows per chunk
    src = heads.encoded(enc, xs, memory_budget=budget)
    h_stream = heads.fit(src, y, task=task)
    h_full = heads.fit(z, y, task=task)
    torch.testing.assert_close(h_stream.coef, h_full.coef, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(h_stream.risk(src, y), h_full.risk(z, y))
    # The stated bound: a chunk of Z (float64 here) never exceeds the budget.
    assert max(enc.sizes) * S * H * z.itemsize <= budget and len(enc.sizes) > 5


# ---- memory budget of the solvers' state -------------------------------------------------------


def test_refit_over_the_memory_budget_is_a_value_error(monkeypatch):
    z = torch.randn(3, 40, 8)
    y = torch.arange(40) % 3
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "1000")
    with pytest.raises(ValueError, match=r"softmax refit of S = 3 subsets at H = 8, C = 3 "
                       r"\(L-BFGS history 10\) needs [\d.]+ \w+ \(\d+ bytes\), more than the "
                       r"memory budget of 1000 B \(1000 bytes: MMKERNELS_MEMORY_BUDGET=1000\); "
                       r"fit fewer subsets at once"):
        heads.fit(z, y, task="classification")
    with pytest.raises(ValueError, match=r"ridge refit of S = 3 subsets at H = 8, T = 1 needs "
                       r"[\d.]+ \w+ \(\d+ bytes\), more than the memory budget of 1000 B"):
        heads.fit(z, torch.randn(40), task="regression")
    # An encoded source is checked from its shape probe, before any chunk is encoded.
    sizes = []

    def encoder(xs):
        sizes.append(len(xs[0]))
        return z[:, :len(xs[0])]

    with pytest.raises(ValueError, match="more than the memory budget of 1000 B"):
        heads.fit(heads.encoded(encoder, [torch.zeros(40, 1)]), y, task="classification")
    assert sizes == [2]
    # At exactly the stated need the fit runs.
    need = heads._softmax_bytes(3, 8, 3, 10, 40, 4)
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", str(need))
    assert bool(heads.fit(z, y, task="classification").converged.all())
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", str(need - 1))
    with pytest.raises(ValueError, match=rf"\({need} bytes\), more than"):
        heads.fit(z, y, task="classification")
    for bad in ("lots", "-5", "12Q"):
        monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", bad)
        with pytest.raises(ValueError, match="MMKERNELS_MEMORY_BUDGET must be a byte count"):
            heads.fit(z, y, task="classification")


def test_huge_refit_raises_before_allocating(monkeypatch):
    monkeypatch.delenv("MMKERNELS_MEMORY_BUDGET", raising=False)
    # 1023 subsets at H = 4096 (a stride-0 view: no memory behind it): ridge needs ~0.8 TB of
    # Gram matrices, the softmax refit at C = 10000 ~0.7 TB of fitted parameters.
    z = torch.zeros(1, 1, 1).expand(1023, 10, 4096)
    with pytest.raises(ValueError, match=r"ridge refit of S = 1023 subsets at H = 4096, T = 1 "
                       r"needs 767.8 GiB \(\d+ bytes\), more than the memory budget"):
        heads.fit(z, torch.randn(10), task="regression")
    with pytest.raises(ValueError, match=r"softmax refit of S = 1023 subsets at H = 4096, "
                       r"C = 10000 .*more than the memory budget"):
        heads.fit(z, torch.arange(10), task="classification", num_classes=10000)


@pytest.fixture
def threads():
    """Set torch's thread count for a test (groups depend on it), restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_many_subsets_are_solved_in_groups_like_one_at_a_time(threads):
    """S * (H+1) * C above PyTorch's intra-op grain: with several threads the subsets are
    solved in groups (84 at H = 64, C = 6); each subset's heads equal its own fit, and
    messages name global subsets."""
    threads(2)
    g = torch.Generator().manual_seed(6)
    S, n, H, C = 90, 40, 64, 6
    y = torch.arange(n) % C
    z = torch.randn(S, n, H, generator=g, dtype=torch.float64) + 0.3 * y[None, :, None]
    h = heads.fit(z, y, task="classification", tol=1e-8)
    assert h.coef.shape == (S, H, C) and h.n_iter.shape == (S,) and bool(h.converged.all())
    for s in (0, 83, 84, 89):
        one = heads.fit(z[s:s + 1], y, task="classification", tol=1e-8)
        torch.testing.assert_close(h.coef[s], one.coef[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(h.intercept[s], one.intercept[0], rtol=0, atol=1e-10)
        assert h.n_iter[s] == one.n_iter[0]
    z[85, 3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf values \(in subsets \[85\]\)"):
        heads.fit(z, y, task="classification")


def test_softmax_budget_charges_one_group_of_solver_state(monkeypatch, threads):
    """With several threads the L-BFGS history is alive for one group at a time: a fit whose
    group needs fit the budget runs although the history of all S subsets would not. With one
    thread all S are one group (the solver's ops are serial anyway)."""
    S, n, H, C = 64, 50, 127, 8  # P = 1024: groups of 31
    z = torch.randn(S, n, H)
    y = torch.arange(n) % C
    threads(2)
    need = heads._softmax_bytes(S, H, C, 10, n, 4, group=31)
    assert need < heads._softmax_bytes(S, H, C, 10, n, 4)
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", str(need))
    h = heads.fit(z, y, task="classification", max_iter=3)
    assert h.coef.shape == (S, H, C)
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", str(need - 1))
    with pytest.raises(ValueError, match=rf"\({need} bytes\), more than"):
        heads.fit(z, y, task="classification", max_iter=3)
    threads(1)
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", str(heads._softmax_bytes(S, H, C, 10, n, 4)))
    one = heads.fit(z, y, task="classification", max_iter=3)
    assert heads._softmax_group(S, (H + 1) * C) == S and one.coef.shape == (S, H, C)


def test_an_encoded_z_is_encoded_once_not_per_solver_iteration(monkeypatch):
    """Z larger than the source's budget is encoded once, chunk by chunk, into a memory-mapped
    temporary file, and the solver reads that: the encoder sees each row once (plus the shape
    probe) however many L-BFGS evaluations the fit takes. (It used to re-encode every chunk at
    every evaluation: 1 + max_iter passes at least.)"""
    S, n, H, C = 40, 64, 127, 8
    g = torch.Generator().manual_seed(3)
    y = torch.arange(n) % C
    z = torch.randn(S, n, H, generator=g) + 0.3 * y[None, :, None]
    calls = []

    def encoder(xs):
        calls.append(len(xs[0]))
        return z[:, xs[0][:, 0]]

    spilled = []
    real_spill = heads._spill
    monkeypatch.setattr(heads, "_spill", lambda *a: spilled.append(a) or real_spill(*a))
    chunk_bytes = S * 16 * (H * 8 + 16 * C)  # 16 rows per chunk: 4 chunks
    src = heads.encoded(encoder, [torch.arange(n)[:, None]], memory_budget=chunk_bytes)
    h = heads.fit(src, y, task="classification", max_iter=30)
    assert int(h.n_iter.max()) > 3 and spilled == [((S, n, H), torch.float32)]
    assert calls[0] == 2 and sum(calls[1:]) == n and max(calls[1:]) <= 16  # probe, one pass
    ref = heads.fit(z, y, task="classification", max_iter=30)
    torch.testing.assert_close(h.coef, ref.coef, rtol=0, atol=0)


def test_fit_leaves_the_thread_count_alone_and_runs_from_threads():
    """No torch.set_num_threads inside fit: concurrent fits from Python threads give the same
    heads as a serial fit, and the caller's thread count is untouched."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 400, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (400,), generator=g)
    ref = heads.fit(z, y, task="classification", tol=1e-8)
    before = torch.get_num_threads()
    results = []

    def worker():
        results.append(heads.fit(z, y, task="classification", tol=1e-8))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.get_num_threads() == before and len(results) == 3
    for h in results:
        torch.testing.assert_close(h.coef, ref.coef, rtol=0, atol=1e-7)


# ---- degenerate inputs ---------------------------------------------------------------------------


def test_constant_columns_and_rank_deficient_ridge():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 40, 4, generator=g, dtype=torch.float64)
    z[:, :, 2] = 3.0              # constant column
    z[1, :, 3] = 2 * z[1, :, 0]   # collinear columns
    y = torch.randn(40, generator=g, dtype=torch.float64)
    h = heads.fit(z, y, task="regression", l2=0.0)  # exactly singular: pseudo-inverse fallback
    assert h.pinv_fallback == [0, 1]
    for s in range(2):
        zc = z[s] - z[s].mean(0)
        w_ref = torch.linalg.lstsq(zc, y - y.mean(), driver="gelsd").solution
        pinv_ref = torch.linalg.pinv(zc) @ (y - y.mean())  # minimum norm
        torch.testing.assert_close(h.coef[s, :, 0], pinv_ref, atol=1e-8, rtol=1e-6)
        assert torch.allclose(zc @ w_ref, zc @ h.coef[s, :, 0], atol=1e-8)
    assert torch.isfinite(heads.fit(z, y, task="regression").coef).all()  # default tiny l2
    hc = heads.fit(z, (y > 0).long(), task="classification", tol=1e-10)
    assert bool(hc.converged.all()) and hc.coef[:, 2].abs().max() < 1e-6


def test_fewer_rows_than_features():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    y = torch.randn(5, generator=g, dtype=torch.float64)
    h = heads.fit(z, y, task="regression", l2=0.0)
    assert h.risk(z, y).max() < 1e-16          # interpolates
    ref = Ridge(alpha=1e-3).fit(z[0].numpy(), y.numpy())
    h2 = heads.fit(z, y, task="regression", l2=1e-3)
    np.testing.assert_allclose(h2.coef[0, :, 0].numpy(), ref.coef_, rtol=1e-6, atol=1e-9)
    hc = heads.fit(z, torch.tensor([0, 1, 0, 1, 1]), task="classification")
    assert bool(hc.converged.all())


def test_class_missing_from_training_labels():
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (120,), generator=g)
    y[y == 1] = 3  # labels {0, 2, 3}; class 1 never seen
    z = torch.randn(1, 120, 3, generator=g, dtype=torch.float64) + y[None, :, None]
    h = heads.fit(z, y, task="classification", l2=1.0, num_classes=4)
    assert bool(h.converged.all()) and h.coef.shape == (1, 3, 4)
    proba = h.decision_function(z).softmax(-1)
    assert proba[..., 1].max() < 1e-4 and not bool((h.predict(z) == 1).any())
    ref = LogisticRegression(C=1.0, max_iter=10_000).fit(z[0].numpy(), y.numpy())
    assert abs(h.accuracy(z, y).item() - ref.score(z[0].numpy(), y.numpy())) <= 2 / 120


def test_single_class():
    z = torch.randn(2, 10, 3)
    y = torch.zeros(10, dtype=torch.long)
    h = heads.fit(z, y, task="classification")
    assert h.coef.shape == (2, 3, 1)
    assert h.risk(z, y).abs().max() < 1e-6 and bool((h.accuracy(z, y) == 1).all())
    h3 = heads.fit(z, y, task="classification", num_classes=3)
    assert bool((h3.predict(z) == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_z_is_a_value_error(bad):
    z = torch.randn(3, 10, 2)
    z[1, 4, 0] = bad
    with pytest.raises(ValueError, match=r"Z holds NaN or Inf values \(in subsets \[1\]\)"):
        heads.fit(z, torch.randn(10), task="regression")
    with pytest.raises(ValueError, match=r"Z holds NaN or Inf values \(in subsets \[1\]\)"):
        heads.fit(z, torch.arange(10) % 3, task="classification")
    fitted = heads.fit(torch.randn(3, 10, 2), torch.arange(10) % 3, task="classification")
    for method in (fitted.predict, fitted.decision_function):
        with pytest.raises(ValueError, match=r"Z holds NaN or Inf values \(in subsets \[1\]\)"):
            method(z)
    with pytest.raises(ValueError, match=r"Z holds NaN or Inf values \(in subsets \[1\]\)"):
        fitted.risk(z, torch.arange(10) % 3)
    with pytest.raises(ValueError, match="encoder's output for rows 0:10\\) holds NaN or Inf"):
        heads.fit(heads.encoded(lambda xs: z[:, :len(xs[0])], [torch.zeros(10, 1)]),
                  torch.randn(10),
                  task="regression")


def test_empty_subsets():
    with pytest.raises(ValueError, match="no subsets \\(S = 0\\): the subsets list is empty"):
        heads.fit(torch.zeros(0, 5, 2), torch.randn(5), task="regression")


# ---- native ops: opcheck and argument checks ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_gram(dtype):
    z = torch.randn(3, 17, 4, dtype=dtype)
    torch.library.opcheck(ops.gram, (z, torch.randn(17, 2, dtype=dtype)))
    torch.library.opcheck(ops.gram, (z, torch.randn(17, dtype=torch.float32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_softmax_regression_loss_grad(dtype, weighted):
    z = torch.randn(2, 23, 5, dtype=dtype)
    y = torch.randint(0, 3, (23,))
    w, b = torch.randn(2, 5, 3, dtype=dtype), torch.randn(2, 3, dtype=dtype)
    sw = torch.rand(23, dtype=dtype) if weighted else None
    torch.library.opcheck(ops.softmax_regression_loss_grad, (z, y, w, b, sw, 0.5))


def test_softmax_op_subset_index_reads_picked_subsets():
    z = torch.randn(5, 30, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    pick = torch.tensor([3, 0, 3])
    w, b = torch.randn(3, 4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    got = ops.softmax_regression_loss_grad(z, y, w, b, None, 0.2, pick)
    ref = ops.softmax_regression_loss_grad(z[pick], y, w, b, None, 0.2)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)
    torch.library.opcheck(ops.softmax_regression_loss_grad, (z, y, w, b, None, 0.2, pick))


@pytest.mark.parametrize("C, H", [(4, 5), (12, 19), (24, 11), (40, 37)])  # lanes, 32-lane, generic
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_op_matches_autograd(C, H, dtype):
    z = torch.randn(2, 300, H, dtype=torch.float64)
    y = torch.randint(0, C, (300,))
    w = torch.randn(2, H, C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, C, dtype=torch.float64, requires_grad=True)
    sw = torch.rand(300, dtype=torch.float64)
    logits = torch.baddbmm(b.unsqueeze(1), z, w)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.expand(2, 300),
                                           reduction="none")
    ref = (ce * sw).sum(1) + 0.35 * w.square().sum((1, 2))
    ref.sum().backward()
    loss, gw, gb = ops.softmax_regression_loss_grad(
        z.to(dtype), y, w.detach().to(dtype), b.detach().to(dtype), sw.to(dtype), 0.7)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else {}
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(gw.double(), w.grad, **tol)
    torch.testing.assert_close(gb.double(), b.grad, **tol)


def _softmax_reference(z, y, w, b, sw, l2):
    """mmkernels.reference's op in float64."""
    return reference.softmax_regression_loss_grad(z.double(), y, w.double(), b.double(),
                                                  sw.double(), l2)


# Every class count of the rows-in-lanes kernel (C <= 16), H below one vector of lanes, at
# 1 (float32) or 2 (float64) vectors, and above the gradient's register block (HC vectors),
# with a tail; n > 256 and not a multiple of 16 (a partial lane block, several flushes).
@pytest.mark.parametrize("C", range(1, 17))
@pytest.mark.parametrize("H", [5, 16, 37, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_lanes_kernel_matches_reference(C, H, dtype):
    g = torch.Generator().manual_seed(1000 * C + H)
    n = 601
    z = torch.randn(2, n, H, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (n,), generator=g)
    w = (0.3 * torch.randn(2, H, C, generator=g, dtype=torch.float64)).to(dtype)
    b = torch.randn(2, C, generator=g, dtype=torch.float64).to(dtype)
    sw = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    loss, gw, gb = ops.softmax_regression_loss_grad(z, y, w, b, sw, 0.7)
    ref = _softmax_reference(z, y, w, b, sw, 0.7)
    # Rounding of sums over n rows of terms of size ~sqrt(H) in the compute dtype.
    eps = torch.finfo(dtype).eps
    rtol, atol = 64 * eps * n ** 0.5, 64 * eps * n * (1 + H ** 0.5)
    for got, want in zip((loss, gw, gb), ref, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_op_threaded_path_matches_one_thread(dtype):
    # K n H = 4 * 2048 * 128 = 2^20: the op splits rows into tasks run by ATen's inter-op
    # helpers and the caller (run_tasks, csrc/cpu/heads/task_pool.h).
    g = torch.Generator().manual_seed(7)
    K, n, H, C = 4, 2048, 128, 6
    z = torch.randn(K, n, H, generator=g, dtype=dtype)
    y = torch.randint(0, C, (n,), generator=g)
    w = 0.1 * torch.randn(K, H, C, generator=g, dtype=dtype)
    b = torch.randn(K, C, generator=g, dtype=dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.softmax_regression_loss_grad(z, y, w, b, None, 0.5)
        torch.set_num_threads(2)
        two = [ops.softmax_regression_loss_grad(z, y, w, b, None, 0.5) for _ in range(3)]
    finally:
        torch.set_num_threads(before)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
    for got in two:
        for a, r in zip(got, one, strict=True):
            torch.testing.assert_close(a, r, **tol)
        for a, r in zip(got, two[0], strict=True):  # fixed thread count: identical bits
            assert torch.equal(a, r)


def test_bfloat16_z_with_subset_index_equals_the_float32_upcast():
    # bfloat16 Z with subset_index: the op converts only the picked subsets (same values).
    z = torch.randn(5, 300, 7).to(torch.bfloat16)
    y = torch.randint(0, 3, (300,))
    pick = torch.tensor([4, 1, 4])
    w, b = torch.randn(3, 7, 3), torch.randn(3, 3)
    got = ops.softmax_regression_loss_grad(z, y, w, b, None, 0.2, pick)
    ref = ops.softmax_regression_loss_grad(z.float(), y, w, b, None, 0.2, pick)
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r)


@pytest.mark.parametrize("text", ["inf", "nan", "1e400", "-1", "infG", "8Q", "8GiBs", "iB", "0",
                                  "0G"])
def test_budget_rejects_non_finite_and_malformed_values(monkeypatch, text):
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", text)
    with pytest.raises(ValueError, match="MMKERNELS_MEMORY_BUDGET must be a byte count"):
        ops.gram(torch.zeros(1, 4, 2), torch.zeros(4))


# "0" is an error, not "no limit" (issue 19: the message says "> 0"; "off" says no limit).
@pytest.mark.parametrize("text", ["8GiB", "8gib", "8G", "8GB", "OFF", "Off", "none"])
def test_budget_accepts_suffixes_and_off_in_any_case(monkeypatch, text):
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", text)
    g, _ = ops.gram(torch.zeros(1, 4, 2), torch.zeros(4))
    assert g.shape == (1, 3, 3)


def test_budget_gib_suffix_is_powers_of_1024(monkeypatch):
    z = torch.zeros(1, 1, 1).expand(64, 4, 256)  # Grams [64, 257, 257]: ~50 MiB in float32
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "1MiB")
    with pytest.raises(torch.OutOfMemoryError, match=r"budget of 1 MiB \(1048576 bytes"):
        ops.gram(z, torch.zeros(4))


def _softmax_args(**kw):
    args = dict(z=torch.randn(2, 6, 3), y=torch.zeros(6, dtype=torch.long),
                w=torch.zeros(2, 3, 4), b=torch.zeros(2, 4), sample_weight=None, l2=1.0,
                subset_index=None)
    args.update(kw)
    return tuple(args.values())


SOFTMAX_ERRORS = [
    (dict(z=torch.randn(6, 3)), r"z must be 3-d \[S, n, H\], got shape \[6, 3\]"),
    (dict(z=torch.zeros(2, 6, 3, dtype=torch.long)), "z must be float32, float64 or bfloat16"),
    (dict(w=torch.zeros(2, 4, 4)), r"w must have shape \[2, 3, 4\] .*got \[2, 4, 4\]"),
    (dict(w=torch.zeros(2, 3, 4, dtype=torch.bfloat16), b=torch.zeros(2, 4, dtype=torch.bfloat16)),
     "w must be float32 or float64"),
    (dict(b=torch.zeros(2, 4, dtype=torch.float64)), "b has dtype Double, expected Float"),
    (dict(b=torch.zeros(2, 5)), r"b must have shape \[2, 4\]"),
    (dict(y=torch.zeros(6, dtype=torch.int32)), "y must be int64 class labels"),
    (dict(y=torch.zeros(5, dtype=torch.long)), r"y must have shape \[6\]"),
    (dict(y=torch.tensor([0, 1, 2, 3, 4, 0])), r"y must hold labels in \[0, 3\].*\[0, 4\]"),
    (dict(sample_weight=torch.ones(5)), r"sample_weight must have shape \[6\]"),
    (dict(l2=-1.0), "l2 must be finite and >= 0, got -1"),
    (dict(subset_index=torch.tensor([0, 2])), r"subset_index must hold subsets in \[0, 1\]"),
    (dict(subset_index=torch.tensor([[0, 1]])), "subset_index must be a 1-d int64 tensor"),
    (dict(subset_index=torch.tensor([1])), r"w must have shape \[1, 3, 4\] \(\[len\(subset_index"),
    (dict(w=torch.zeros(2, 12)), r"w must be 3-d \[S, H, C\], got shape \[2, 12\]"),
    (dict(w=torch.zeros(2, 3, 0), b=torch.zeros(2, 0)), "w must have at least one class"),
    (dict(sample_weight=torch.ones(6, dtype=torch.long)), "sample_weight must be float32"),
    (dict(y=None), "y must be a tensor, got None"),
    (dict(z=None), "z must be a tensor, got None"),
]
# Errors that depend on the values of y or subset_index: only the CPU kernel reads data.
DATA_DEPENDENT = ("y must hold labels", "subset_index must hold subsets")


@pytest.mark.parametrize("kw, message", SOFTMAX_ERRORS)
def test_softmax_op_argument_messages(kw, message):
    with pytest.raises(ValueError, match=message):
        ops.softmax_regression_loss_grad(*_softmax_args(**kw))


GRAM_ERRORS = [
    (torch.randn(5, 2), torch.randn(5), r"z must be 3-d \[S, n, H\]"),
    (torch.randn(1, 5, 2), torch.randn(4), "y has 4 rows, expected n = 5"),
    (torch.randn(1, 5, 2), torch.randn(5, 1, 1), r"y must be \[n\] or \[n, T\]"),
    (torch.randn(1, 5, 2), torch.ones(5, dtype=torch.long), "y must be float32, float64"),
    (torch.randn(1, 5, 2, dtype=torch.float16), torch.randn(5), "z must be float32, float64"),
    (torch.randn(1, 5, 2), None, "y must be a tensor, got None"),
]


@pytest.mark.parametrize("z, y, message", GRAM_ERRORS)
def test_gram_argument_messages(z, y, message):
    with pytest.raises(ValueError, match=message):
        ops.gram(z, y)


def _on_meta(args: tuple) -> tuple:
    return tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                 if isinstance(a, torch.Tensor) else a for a in args)


def _strides(t: torch.Tensor) -> tuple:
    """Strides of the dims of size > 1 (any stride is the same layout for the others)."""
    return tuple(st for size, st in zip(t.shape, t.stride()) if size > 1)


def _outcome(op, args: tuple):
    """("raised", type, message) or ("ok", [(shape, stride, dtype) of each output])."""
    try:
        outs = op(*args)
    except Exception as e:  # noqa: BLE001 - the outcome is what is compared
        return "raised", type(e), str(e)
    return "ok", [(tuple(t.shape), _strides(t), t.dtype) for t in outs]


# The Meta kernels run the CPU kernels' checks (csrc/include/mmkernels/heads_plan.h): the same
# exception and message on meta tensors as on CPU tensors, except for the range checks of y and
# subset_index, which read data (the meta call then returns the CPU call's output shapes).
@pytest.mark.parametrize("kw, message", SOFTMAX_ERRORS)
def test_softmax_op_meta_raises_like_cpu(kw, message):
    args = _softmax_args(**kw)
    cpu = _outcome(ops.softmax_regression_loss_grad, args)
    meta = _outcome(ops.softmax_regression_loss_grad, _on_meta(args))
    assert cpu[0] == "raised" and cpu[1] is ValueError
    if any(d in message for d in DATA_DEPENDENT):
        valid = {k: torch.zeros_like(v) if k in ("y", "subset_index") else v
                 for k, v in kw.items()}
        assert meta == _outcome(ops.softmax_regression_loss_grad, _softmax_args(**valid))
    else:
        assert meta == cpu


@pytest.mark.parametrize("z, y, message", GRAM_ERRORS)
def test_gram_meta_raises_like_cpu(z, y, message):
    cpu = _outcome(ops.gram, (z, y))
    assert cpu[0] == "raised" and cpu[1] is ValueError
    assert _outcome(ops.gram, _on_meta((z, y))) == cpu


@pytest.mark.parametrize("ydim", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_meta_outputs_match_cpu_outputs(ydim, dtype):
    z = torch.randn(3, 7, 4, dtype=dtype)
    y = torch.randn(7, dtype=dtype) if ydim == 1 else torch.randn(7, 2, dtype=dtype)
    assert _outcome(ops.gram, _on_meta((z, y))) == _outcome(ops.gram, (z, y))
    for wdtype in (torch.float32, torch.float64):
        for pick in (None, torch.tensor([2, 0])):
            K = 3 if pick is None else 2
            args = (z, torch.randint(0, 5, (7,)), torch.randn(K, 4, 5, dtype=wdtype),
                    torch.randn(K, 5, dtype=wdtype), torch.rand(7), 0.5, pick)
            assert (_outcome(ops.softmax_regression_loss_grad, _on_meta(args))
                    == _outcome(ops.softmax_regression_loss_grad, args))


def test_meta_calls_allocate_nothing_so_the_budget_does_not_apply(monkeypatch):
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "1M")
    z = torch.zeros(1, 1, 1).expand(64, 4, 256)  # Grams [64, 257, 257]: 50 MiB in float32
    assert _outcome(ops.gram, (z, torch.zeros(4)))[1] is torch.OutOfMemoryError
    assert _outcome(ops.gram, _on_meta((z, torch.zeros(4))))[0] == "ok"


@pytest.mark.parametrize("call, message", [
    (lambda z, y: heads.fit(z, y, task="ranking"), "task must be 'regression' or"),
    (lambda z, y: heads.fit(z, y, task="regression", l2=-1.0), "l2 must be finite and >= 0"),
    (lambda z, y: heads.fit(z, y[:3], task="regression"), r"y must have n = 6 rows"),
    (lambda z, y: heads.fit(z, y.long(), task="regression"), "y must be a float tensor"),
    (lambda z, y: heads.fit(z, y, task="classification"), "y must be 1-d integer class labels"),
    (lambda z, y: heads.fit(z, -torch.ones(6, dtype=torch.long), task="classification"),
     "y must hold labels >= 0"),
    (lambda z, y: heads.fit(z, torch.arange(6), task="classification", num_classes=3),
     "num_classes must be >= 1 and above every label"),
    (lambda z, y: heads.fit(z, y, task="regression", class_weight="balanced"),
     "class_weight applies to task='classification' only"),
    (lambda z, y: heads.fit(z, torch.arange(6) % 2, task="classification", class_weight="auto"),
     "class_weight must be None, 'balanced' or a tensor"),
    (lambda z, y: heads.fit(z, torch.arange(6) % 2, task="classification",
                            class_weight=torch.ones(3)),
     r"class_weight tensor must have shape \[C\]"),
    (lambda z, y: heads.fit(z, torch.arange(6) % 2, task="classification", tol=0.0),
     "tol must be finite and > 0"),
    (lambda z, y: heads.fit(z.numpy(), y, task="regression"), "Z must be a tensor"),
    (lambda z, y: heads.fit(z[0], y, task="regression"), r"Z must be 3-d \[S, n, H\]"),
    (lambda z, y: heads.fit(z.long(), y, task="regression"), "Z must be float32, float64"),
    (lambda z, y: heads.fit(z[:, :0], y[:0], task="regression"), "Z has no rows"),
    (lambda z, y: heads.fit(z, torch.full((6,), float("nan")), task="regression"),
     "y holds NaN or Inf"),
    (lambda z, y: heads.fit(z, y, task="regression").accuracy(z, y),
     "accuracy is defined for task='classification' only"),
    (lambda z, y: heads.fit(z, y, task="regression").predict(z[:, :, :1]),
     r"Z must be \[S=2, n, H=3\] like the fitted heads"),
    (lambda z, y: heads.fit(z, torch.arange(6) % 2, task="classification").risk(
        z, torch.full((6,), 5)), "y holds label 5 but the heads have 2 classes"),
    (lambda z, y: heads.encoded(lambda xs: z, [torch.zeros(6, 1)], memory_budget=0),
     "memory_budget must be > 0 bytes"),
    (lambda z, y: heads.encoded(lambda xs: z, []), "xs must be a non-empty list"),
    (lambda z, y: heads.encoded(lambda xs: z, [torch.zeros(6, 1), torch.zeros(5, 1)]),
     r"xs\[1\] has 5 rows, expected 6"),
    (lambda z, y: heads.fit(heads.encoded(lambda xs: z[0], [torch.zeros(6, 1)]), y,
                            task="regression"), r"encoder must return \[S, 2, H\]"),
])
def test_python_argument_messages(call, message):
    z, y = torch.randn(2, 6, 3), torch.randn(6)
    with pytest.raises(ValueError, match=message):
        call(z, y)


def test_found_by_the_fuzzer():
    """H = 0 classification reshaped with -1 (error); None for y gave misleading messages."""
    z = torch.randn(2, 3, 0)
    fitted = heads.fit(z, torch.tensor([0, 1, 1]), task="classification")
    assert fitted.predict(z).shape == (2, 3)
    with pytest.raises(ValueError, match="gram: y must be a tensor, got None"):
        torch.ops.mmkernels.gram(torch.randn(1, 2, 2), None)
    with pytest.raises(ValueError, match="softmax_regression_loss_grad: y must be a tensor"):
        torch.ops.mmkernels.softmax_regression_loss_grad(
            torch.randn(1, 2, 2), None, torch.zeros(1, 2, 3), torch.zeros(1, 3), None, 0.0, None)


def test_native_ops_refuse_calls_over_the_budget(monkeypatch):
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "1M")
    z = torch.zeros(1, 1, 1).expand(64, 4, 256)  # Grams [64, 257, 257]: 50 MiB in float32
    with pytest.raises(torch.OutOfMemoryError, match=r"gram: needs about .* bytes\) for the "
                       r"Gram matrices .* more than the memory budget of 1 MiB"):
        torch.ops.mmkernels.gram(z, torch.zeros(4))
