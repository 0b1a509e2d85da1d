"""Exact Shapley values over modality subsets (mmkernels.experiments.shapley)."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from mmkernels.experiments.shapley import empty_set_values, shapley_values


def test_two_player_game_by_hand() -> None:
    # v({})=0, v({0})=1, v({1})=2, v({0,1})=4:
    # phi_0 = 1/2 (1 - 0) + 1/2 (4 - 2) = 1.5; phi_1 = 1/2 (2 - 0) + 1/2 (4 - 1) = 2.5
    phi = shapley_values({(0,): 1.0, (1,): 2.0, (0, 1): 4.0}, 2, 0.0)
    assert phi == pytest.approx([1.5, 2.5])


def test_efficiency_symmetry_dummy() -> None:
    rng = np.random.default_rng(0)
    k = 4
    subs = [s for r in range(1, k + 1) for s in combinations(range(k), r)]
    v = {s: float(rng.normal()) for s in subs}
    phi = shapley_values(v, k, empty_value=0.3)
    assert sum(phi) == pytest.approx(v[tuple(range(k))] - 0.3)
    # additive game: v(S) = sum of weights -> phi = weights; modality 3 is a dummy (weight 0)
    w = [1.0, 2.0, 2.0, 0.0]
    phi = shapley_values({s: sum(w[j] for j in s) for s in subs}, k, 0.0)
    assert phi == pytest.approx(w)


def test_missing_subset_and_empty_values() -> None:
    with pytest.raises(ValueError, match="missing"):
        shapley_values({(0,): 1.0}, 2, 0.0)
    e = empty_set_values(np.array([0, 0, 1]), np.array([0, 1]), "classification")
    assert e["acc"] == pytest.approx(0.5)
    assert e["risk"] == pytest.approx(-(np.log(2 / 3) + np.log(1 / 3)) / 2)
    r = empty_set_values(np.array([1.0, 3.0]), np.array([2.0, 4.0]), "regression")
    assert r["risk"] == pytest.approx(2.0)
