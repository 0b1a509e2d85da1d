"""mmkernels.heads: Z grouped by width (GroupedZ / GroupedHeads) and l2 chosen by k-fold
cross-validation (select_l2 / fit_cv) against scikit-learn's LogisticRegressionCV and RidgeCV
on the same folds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegressionCV, RidgeCV

import mmkernels  # noqa: F401  (registers the ops)
from mmkernels import heads


def _splits(fold: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    f = fold.numpy()
    return [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in range(int(f.max()) + 1)]


def _classification(S=3, n=150, H=4, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    signal = torch.tensor([1.0, 0.5, 0.2, 0.8][:S])[:, None, None]
    z = torch.randn(S, n, H, generator=g, dtype=torch.float64) + 0.7 * signal * y[None, :, None]
    return z, y


# ---- folds ---------------------------------------------------------------------------------------


def test_kfold_is_stratified_balanced_and_deterministic():
    y = torch.tensor([0] * 7 + [1] * 5 + [2] * 13)
    fold = heads.kfold(y, 5)
    assert torch.equal(fold, heads.kfold(y, 5))
    sizes = torch.bincount(fold, minlength=5)
    assert int(sizes.max() - sizes.min()) <= 1
    for c in range(3):
        per = torch.bincount(fold[y == c], minlength=5)
        assert int(per.max() - per.min()) <= 1          # each class spread evenly
    with pytest.raises(ValueError, match=r"needs 2 <= folds <= n = 3 rows, got folds = 4"):
        heads.kfold(torch.arange(3), 4)


# ---- against scikit-learn ------------------------------------------------------------------------


@pytest.mark.parametrize("sort_rows", [False, True])  # interleaved folds, or contiguous blocks
def test_select_l2_matches_logistic_regression_cv(sort_rows):
    z, y = _classification()
    fold = heads.kfold(y, 5)
    if sort_rows:
        order = torch.argsort(fold, stable=True)
        z, y, fold = z[:, order], y[order], fold[order]
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    heads_cv, found = heads.fit_cv(z, y, task="classification", grid=grid, folds=fold, tol=1e-10)
    assert found.grid[0].tolist() == sorted(grid, reverse=True)
    for s in range(z.shape[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ref = LogisticRegressionCV(Cs=[1 / v for v in found.grid[s].tolist()],
                                       cv=_splits(fold), scoring="neg_log_loss", tol=1e-8,
                                       max_iter=100_000).fit(z[s].numpy(), y.numpy())
            scores = -np.asarray(ref.scores_[0]).mean(0)   # mean over folds, in Cs order
        np.testing.assert_allclose(found.score[s].numpy(), scores, rtol=1e-6, atol=1e-8)
        assert found.l2[s].item() == pytest.approx(1 / ref.C_[0])
        np.testing.assert_allclose(heads_cv.coef[s].numpy(), ref.coef_.T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(heads_cv.intercept[s].numpy(), ref.intercept_, rtol=1e-4,
                                   atol=1e-5)
    assert len(set(found.l2.tolist())) > 1     # the subsets got different l2 values


@pytest.mark.parametrize("T", [1, 2])
def test_select_l2_matches_ridge_cv(T):
    g = torch.Generator().manual_seed(1)
    S, n, H = 3, 80, 5
    z = torch.randn(S, n, H, generator=g, dtype=torch.float64) + 2.0
    noise = torch.tensor([0.1, 1.0, 5.0])[:, None, None]
    y = (z[0, :, :T] * 2 + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64))
    y = y.squeeze(1) if T == 1 else y
    zz = z + noise * torch.randn(S, n, H, generator=g, dtype=torch.float64)
    fold = heads.kfold(y, 4, stratify=False)
    grid = [0.01, 1.0, 10.0, 100.0, 1000.0]
    fitted, found = heads.fit_cv(zz, y, task="regression", grid=grid, folds=fold)
    for s in range(S):
        ref = RidgeCV(alphas=grid, cv=_splits(fold), scoring="neg_mean_squared_error").fit(
            zz[s].numpy(), y.numpy())
        assert found.l2[s].item() == ref.alpha_
        assert found.score[s].min().item() == pytest.approx(-ref.best_score_, rel=1e-9)
        np.testing.assert_allclose(fitted.coef[s].numpy(), ref.coef_.reshape(T, H).T,
                                   rtol=1e-8, atol=1e-10)
    # The default grid is per subset, relative to its Gram: scale-free.
    a = heads.select_l2(zz, y, task="regression", folds=fold)
    b = heads.select_l2(zz * 1000.0, y, task="regression", folds=fold)
    torch.testing.assert_close(b.grid, a.grid * 1e6)
    torch.testing.assert_close(b.l2, a.l2 * 1e6)


def test_select_l2_default_grid_and_messages():
    z, y = _classification(S=1, n=60)
    found = heads.select_l2(z, y, task="classification")
    assert found.grid[0].tolist() == pytest.approx(heads.default_l2_grid("classification", 60))
    assert found.num_folds == 5 and bool(torch.isfinite(found.score).all())
    with pytest.raises(ValueError, match="grid must hold l2 values that are finite and >= 0"):
        heads.select_l2(z, y, task="classification", grid=[1.0, -2.0])
    with pytest.raises(ValueError, match=r"folds must be an int or fold ids \[n\] = \[60\]"):
        heads.select_l2(z, y, task="classification", folds=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 folds, each with at least one row"):
        heads.select_l2(z, y, task="classification", folds=torch.zeros(60, dtype=torch.long))


# ---- Z grouped by width ------------------------------------------------------------------------


def _padded(S=4, n=90, B=3, K=3, seed=2):
    """A late-fusion-like Z: subset s holds the blocks of its modalities, zeros elsewhere."""
    g = torch.Generator().manual_seed(seed)
    subsets = [(0,), (1, 2), (0, 2), (0, 1, 2)][:S]
    y = torch.arange(n) % 3
    z = torch.zeros(S, n, K * B, dtype=torch.float64)
    cols = []
    for s, sub in enumerate(subsets):
        c = torch.cat([torch.arange(k * B, (k + 1) * B) for k in sub])
        z[s][:, c] = torch.randn(n, len(c), generator=g, dtype=torch.float64) + 0.5 * y[:, None]
        cols.append(c)
    return z, y, cols


def test_grouped_z_fits_each_subset_at_its_own_width():
    z, y, cols = _padded()
    gz = heads.GroupedZ.from_source(z, cols)
    assert gz.widths == [3, 6, 6, 9] and [len(i) for i, _ in gz.groups] == [1, 2, 1]
    assert gz.nbytes == 90 * 8 * (3 + 6 + 6 + 9)
    grouped = heads.fit(gz, y, task="classification", l2=torch.tensor([0.5, 1.0, 2.0, 4.0]),
                        tol=1e-10)
    risk = grouped.risk(gz, y)
    for s, c in enumerate(cols):
        alone = heads.fit(z[s:s + 1, :, c], y, task="classification", l2=[0.5, 1.0, 2.0, 4.0][s],
                          tol=1e-10)
        coef, intercept = grouped.head(s)
        torch.testing.assert_close(coef, alone.coef[0], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(intercept, alone.intercept[0], rtol=1e-6, atol=1e-8)
        assert risk[s].item() == pytest.approx(alone.risk(z[s:s + 1, :, c], y).item(), rel=1e-7)
    assert grouped.l2.tolist() == [0.5, 1.0, 2.0, 4.0] and bool(grouped.converged.all())
    assert grouped.predict(gz).shape == (4, 90)
    ridge = heads.fit(gz, z[3, :, 0], task="regression", l2=1e-3)
    assert ridge.risk(gz, z[3, :, 0])[3].item() < 1e-6        # y is a column of subset 3


# from_source checks both from one pass (column minima and maxima): an infinity of either
# sign or a NaN, in a column kept or one dropped, is named as NaN/Inf in its subset.
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("column", [0, 5])          # kept / dropped for subset 2 (A, C)
def test_grouped_z_names_nan_or_inf_in_any_column(bad, column):
    z, y, cols = _padded()
    assert (column in cols[2].tolist()) == (column == 0)
    z[2, 11, column] = bad
    with pytest.raises(ValueError, match=r"Z holds NaN or Inf values \(in subsets \[2\]\)"):
        heads.GroupedZ.from_source(z, cols)
    src = heads.encoded(lambda xs: z[:, :len(xs[0])], [torch.zeros(z.shape[1], 1)])
    with pytest.raises(ValueError, match=r"0:90\) holds NaN or Inf values \(in subsets \[2\]"):
        heads.GroupedZ.from_source(src, cols)


def test_grouped_z_checks_what_it_drops_and_spills_over_its_budget(monkeypatch):
    z, y, cols = _padded()
    bad = z.clone()
    bad[1, 7, 0] = 0.25                                    # subset 1 lacks modality 0
    with pytest.raises(ValueError, match=r"non-zero outside the columns given for subsets \[1\]"):
        heads.GroupedZ.from_source(bad, cols)
    bad = z.clone()
    bad[2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Z holds NaN or Inf values \(in subsets \[2\]\)"):
        heads.GroupedZ.from_source(bad, cols)
    spilled = []
    real = heads._spill
    monkeypatch.setattr(heads, "_spill", lambda *a: spilled.append(a) or real(*a))
    calls = []

    def encoder(xs):
        calls.append(len(xs[0]))
        return z[:, xs[0][:, 0].long()]

    src = heads.encoded(encoder, [torch.arange(90.0)[:, None]], memory_budget=4000)
    gz = heads.GroupedZ.from_source(src, cols)
    assert len(spilled) == 3 and sum(calls[1:]) == 90 and max(calls[1:]) < 90
    ref = heads.GroupedZ.from_source(z, cols)
    for (i, a), (j, b) in zip(gz.groups, ref.groups, strict=True):
        assert torch.equal(i, j) and torch.equal(a, b)
    with pytest.raises(ValueError, match="columns has 2 entries, expected S = 4"):
        heads.GroupedZ.from_source(z, cols[:2])
    h = heads.fit(ref, y, task="classification")
    with pytest.raises(ValueError, match="Z must group the subsets as the fitted heads do"):
        h.risk(heads.GroupedZ.from_source(z), y)


def test_fit_cv_on_grouped_z_equals_per_group_fits():
    z, y, cols = _padded()
    gz = heads.GroupedZ.from_source(z, cols)
    fitted, found = heads.fit_cv(gz, y, task="classification", grid=[0.1, 10.0], folds=3,
                                 tol=1e-9)
    for ids, zg in gz.groups:
        _, part = heads.fit_cv(zg, y, task="classification", grid=[0.1, 10.0], folds=3,
                               tol=1e-9)
        torch.testing.assert_close(found.score[ids], part.score)
    direct = heads.fit(gz, y, task="classification", l2=found.l2, tol=1e-9)
    torch.testing.assert_close(fitted.risk(gz, y), direct.risk(gz, y), rtol=1e-6, atol=1e-9)
