"""Bundled offline multi-view datasets: shapes, the quadrant split, standardisation, seeds."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from mmkernels.experiments.data.bundled import BUNDLED, load_bundled


def test_digits_shapes_and_split():
    ds = load_bundled("digits")
    assert ds.names == ["TL", "TR", "BL", "BR"] and ds.dims == [16, 16, 16, 16]
    assert ds.n == 1797 and ds.task == "classification" and ds.n_classes == 10
    assert all(a.dtype == np.float32 for a in ds.modalities.values())
    n_test = ds.test().n
    assert n_test == int(np.ceil(0.3 * 1797)) and ds.train().n == 1797 - n_test
    # stratified: every class keeps (nearly) its share in the test split
    share = np.bincount(ds.test().labels, minlength=10) / np.bincount(ds.labels, minlength=10)
    assert np.all(np.abs(share - 0.3) < 0.03)


def test_digits_quadrants_rebuild_the_images():
    ds = load_bundled("digits", standardize=False)
    q = {k: v.reshape(-1, 4, 4) for k, v in ds.modalities.items()}
    images = np.block([[q["TL"], q["TR"]], [q["BL"], q["BR"]]])
    np.testing.assert_array_equal(images, load_digits().images)


def test_standardised_with_train_statistics():
    ds = load_bundled("digits", seed=3)
    train = np.concatenate(list(ds.train().modalities.values()), axis=1)
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    std = train.std(axis=0)
    # constant pixels (blank borders) are only centred
    assert np.all((np.abs(std - 1) < 1e-4) | (std < 1e-6)) and (std < 1e-6).any()
    # test rows are transformed with the train statistics, so they are not exactly centred
    test = np.concatenate(list(ds.test().modalities.values()), axis=1)
    assert np.abs(test.mean(axis=0)).max() > 1e-3


def test_breast_cancer():
    ds = load_bundled("breast_cancer")
    assert ds.names == ["mean", "se", "worst"] and ds.dims == [10, 10, 10]
    assert ds.n == 569 and ds.label_names == ["malignant", "benign"]
    assert ds.train().n + ds.test().n == 569


@pytest.mark.parametrize("name", BUNDLED)
def test_deterministic_per_seed(name):
    a, b, c = load_bundled(name, seed=1), load_bundled(name, seed=1), load_bundled(name, seed=2)
    np.testing.assert_array_equal(a.split, b.split)
    for k in a.names:
        np.testing.assert_array_equal(a.modalities[k], b.modalities[k])
    assert not np.array_equal(a.split, c.split)


def test_unknown_name():
    with pytest.raises(ValueError, match=r"name: expected one of \('digits', 'breast_cancer'\)"):
        load_bundled("mnist")
