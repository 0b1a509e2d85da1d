"""The Experiment 2 generator: shapes, seeding, overlap semantics and exact Bayes risks."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmkernels.experiments.data.dataset import MultiModalDataset
from mmkernels.experiments.data.synthetic import (
    OverlapGenerator,
    make_overlap_regression,
    mix_bayes_risk,
)


def all_masks(k):
    return [np.array(m) for m in itertools.product([False, True], repeat=k)]


def test_shapes_dtypes_and_split():
    ds = make_overlap_regression(0.5, dim=7, n_train=30, n_test=20)
    assert ds.names == ["1", "2", "3", "4"]
    assert ds.dims == [7, 7, 7, 7]
    assert ds.n == 50 and ds.task == "regression"
    assert all(a.dtype == np.float32 for a in ds.modalities.values())
    assert ds.labels.dtype == np.float32 and ds.labels.shape == (50,)
    assert ds.train().n == 30 and ds.test().n == 20
    # no noise: the target is the sum of every feature
    total = sum(a.astype(np.float64).sum(axis=1) for a in ds.modalities.values())
    np.testing.assert_allclose(ds.labels, total, rtol=1e-5, atol=1e-4)


def test_seeding():
    a = make_overlap_regression(0.3, dim=5, n_train=40, n_test=10, seed=3)
    b = make_overlap_regression(0.3, dim=5, n_train=40, n_test=10, seed=3)
    c = make_overlap_regression(0.3, dim=5, n_train=40, n_test=10, seed=4)
    for k in a.names:
        np.testing.assert_array_equal(a.modalities[k], b.modalities[k])
        assert not np.array_equal(a.modalities[k], c.modalities[k])
    # the train draw has its own stream: it does not depend on n_test
    d = make_overlap_regression(0.3, dim=5, n_train=40, n_test=99, seed=3)
    np.testing.assert_array_equal(a.train().modalities["2"], d.train().modalities["2"])


@pytest.mark.parametrize("recipe", ["mix", "share"])
def test_w_one_makes_modalities_identical(recipe):
    ds = make_overlap_regression(1.0, dim=6, n_train=20, n_test=5, recipe=recipe)
    for k in ds.names[1:]:
        np.testing.assert_array_equal(ds.modalities[k], ds.modalities["1"])


def test_share_recipe_copies_round_w_dim_coordinates():
    ds = make_overlap_regression(0.35, dim=20, n_train=50, n_test=0, recipe="share")
    x1 = ds.modalities["1"]
    for k in ds.names[1:]:
        same = (ds.modalities[k] == x1).all(axis=0)
        assert same.sum() == 7  # round(0.35 * 20)
    # modality sets are drawn separately, not all the same coordinates
    sets = [tuple((ds.modalities[k] == x1).all(axis=0)) for k in ds.names[1:]]
    assert len(set(sets)) > 1


def test_table4_formula():
    """Subsets containing modality 1: risk = dim (K - k) (1 - w)^2, the paper's Table 4."""
    for w in (1.0, 0.8, 0.5, 0.2, 0.0):
        gen = OverlapGenerator(w)
        for k in range(1, 5):
            names = [str(i + 1) for i in range(k)]
            assert gen.bayes_risk(names) == pytest.approx(100 * (4 - k) * (1 - w) ** 2, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    w=st.floats(0.0, 1.0),
    k=st.integers(1, 5),
    dim=st.integers(1, 4),
    noise=st.sampled_from([0.0, 0.5]),
)
def test_covariance_risk_matches_closed_form(w, k, dim, noise):
    gen = OverlapGenerator(w, n_modalities=k, dim=dim, noise=noise)
    for mask in all_masks(k):
        expected = mix_bayes_risk(w, mask, dim=dim, noise=noise)
        assert gen.bayes_risk(mask) == pytest.approx(expected, rel=1e-7, abs=1e-7)


def ols_test_mse(ds, names):
    """Test MSE of least squares (with intercept) fitted on the train rows."""

    def design(part):
        cols = [part.modalities[n].astype(np.float64) for n in names]
        return np.column_stack([np.ones(part.n), *cols])

    tr, te = ds.train(), ds.test()
    x = design(tr)
    # Normal equations solved by (small) lstsq: fast, and fine with the singular Gram
    # matrix of w = 1, where modalities coincide.
    coef, *_ = np.linalg.lstsq(x.T @ x, x.T @ tr.labels.astype(np.float64), rcond=None)
    return float(np.mean((design(te) @ coef - te.labels) ** 2))


@pytest.mark.parametrize("recipe", ["mix", "share"])
@pytest.mark.parametrize("w", [1.0, 0.7, 0.3, 0.0])
def test_empirical_risk_matches_bayes_risk(recipe, w):
    gen = OverlapGenerator(w, dim=10, recipe=recipe, seed=1)
    ds = gen.dataset(n_train=4000, n_test=4000)
    for names in (["1"], ["1", "2"], ["1", "2", "3"], ["1", "2", "3", "4"], ["2"], ["2", "4"]):
        risk = gen.bayes_risk(names)
        mse = ols_test_mse(ds, names)
        assert mse == pytest.approx(risk, rel=0.08, abs=1e-3), (names, mse, risk)


def test_noise_adds_variance():
    gen = OverlapGenerator(0.5, n_modalities=2, dim=3, noise=2.0, seed=5)
    ds = gen.dataset(n_train=3000, n_test=3000)
    assert gen.bayes_risk(["1", "2"]) == pytest.approx(4.0)
    assert ols_test_mse(ds, ["1", "2"]) == pytest.approx(4.0, rel=0.08)


def test_from_info_rebuilds_generator(tmp_path):
    ds = make_overlap_regression(
        0.2, n_modalities=3, dim=4, n_train=5, n_test=5, seed=9, recipe="share"
    )
    gen = OverlapGenerator.from_info(ds.info)
    assert gen == OverlapGenerator(0.2, 3, 4, "share", 0.0, 9)
    np.testing.assert_array_equal(gen.dataset(5, 5).modalities["3"], ds.modalities["3"])
    ds.save(tmp_path / "syn.npz")  # the recipe survives a save/load
    assert OverlapGenerator.from_info(MultiModalDataset.load(tmp_path / "syn.npz").info) == gen


def test_empty_subset_is_variance_of_y():
    gen = OverlapGenerator(0.4, n_modalities=3, dim=2)
    # y_j = (1 + 2 w) x1 + (1 - w)(u2 + u3)
    assert gen.bayes_risk([]) == pytest.approx(2 * ((1 + 0.8) ** 2 + 2 * 0.36))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(w=1.5), r"w: expected a value in \[0, 1\], got 1.5"),
        (dict(w=0.5, recipe="blend"), r"recipe: expected one of \('mix', 'share'\), got 'blend'"),
        (dict(w=0.5, n_modalities=0), "n_modalities: expected >= 1, got 0"),
        (dict(w=0.5, dim=0), "dim: expected >= 1, got 0"),
        (dict(w=0.5, noise=-1.0), "noise: expected a standard deviation >= 0"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OverlapGenerator(**kwargs)


def test_subset_errors():
    gen = OverlapGenerator(0.5)
    with pytest.raises(ValueError, match=r"unknown modality names \['5'\]"):
        gen.bayes_risk(["1", "5"])
    with pytest.raises(ValueError, match="bool mask"):
        gen.bayes_risk([0, 1])  # ints are refused: 0-based vs the paper's 1-based
    with pytest.raises(ValueError, match=r"bool mask must have shape \[4\]"):
        gen.bayes_risk([True, False])
