"""The stratified training-fraction rule (mmkernels.experiments.sampling)."""

from __future__ import annotations

import numpy as np
import pytest

from mmkernels.experiments.sampling import stratified_fraction


def _labels() -> np.ndarray:
    # 3 classes with counts 50, 30, 20
    return np.repeat(np.arange(3), [50, 30, 20])


def test_at_least_one_per_class_at_tiny_fractions() -> None:
    y = _labels()
    for f in (1e-4, 1e-3, 1e-2):
        idx = stratified_fraction(y, f, seed=0)
        assert len(idx) == 3
        assert sorted(np.unique(y[idx]).tolist()) == [0, 1, 2]


def test_size_and_proportions() -> None:
    y = _labels()
    idx = stratified_fraction(y, 0.5, seed=1)
    assert len(idx) == 50
    counts = np.bincount(y[idx], minlength=3)
    assert counts.tolist() == [25, 15, 10]
    assert len(np.unique(idx)) == len(idx)
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats


def test_full_fraction_and_determinism() -> None:
    y = _labels()
    assert np.array_equal(stratified_fraction(y, 1.0, seed=3), np.arange(100))
    a = stratified_fraction(y, 0.2, seed=7)
    b = stratified_fraction(y, 0.2, seed=7)
    c = stratified_fraction(y, 0.2, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_class_caps_and_regression() -> None:
    y = np.array([0] * 98 + [1, 2])  # rare classes cannot take more than they have
    idx = stratified_fraction(y, 0.9, seed=0)
    assert len(idx) == 90 and set(y[idx]) == {0, 1, 2}
    r = stratified_fraction(None, 0.25, seed=0, n=40)
    assert len(r) == 10 and r.max() < 40
    with pytest.raises(ValueError):
        stratified_fraction(y, 0.0, seed=0)
