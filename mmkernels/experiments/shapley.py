"""Exact Shapley values of modalities from a full subset sweep.

With K modalities and a value v(S) for every subset S (all 2^K - 1 non-empty ones from the
sweep, plus v(empty)), modality k's Shapley value is

    phi_k = sum_{S not containing k} |S|! (K - |S| - 1)! / K! * (v(S + {k}) - v(S)).

Efficiency holds exactly: sum_k phi_k = v(full) - v(empty). The empty set is never trained;
its value is the chance level: for accuracy the accuracy of always predicting the most
frequent training class (measured on the test labels), for risk the risk of the best
constant predictor (the cross-entropy of the training class frequencies on the test labels,
or the variance of the test targets around the training mean for regression). The report
states which value was used.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from math import factorial

import numpy as np

__all__ = ["shapley_values", "empty_set_values"]


def shapley_values(
    values: Mapping[tuple[int, ...], float], num_modalities: int, empty_value: float
) -> list[float]:
    """Exact Shapley value of each modality (see the module docstring).

    Args:
        values: v(S) for every non-empty subset S (a sorted tuple of modality indices).
        num_modalities: K.
        empty_value: v(empty).
    """
    k_all = num_modalities
    v = {tuple(sorted(s)): float(x) for s, x in values.items()}
    v[()] = float(empty_value)
    missing = [s for r in range(1, k_all + 1) for s in combinations(range(k_all), r)
               if s not in v]
    if missing:
        raise ValueError(f"values must hold every non-empty subset; missing {missing[:5]}")
    phi = []
    for k in range(k_all):
        others = [j for j in range(k_all) if j != k]
        total = 0.0
        for r in range(k_all):
            weight = factorial(r) * factorial(k_all - r - 1) / factorial(k_all)
            for s in combinations(others, r):
                total += weight * (v[tuple(sorted((*s, k)))] - v[s])
        phi.append(total)
    return phi


def empty_set_values(
    train_y: np.ndarray, test_y: np.ndarray, task: str, num_classes: int | None = None
) -> dict[str, float]:
    """v(empty) for "acc" (classification) and "risk": the best constant predictor fitted on
    the training labels, scored on the test labels (see the module docstring)."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if task == "regression":
        mean = train_y.astype(np.float64).mean(axis=0)
        return {"risk": float(((test_y - mean) ** 2).mean())}
    c = int(num_classes or max(train_y.max(), test_y.max()) + 1)
    counts = np.bincount(train_y, minlength=c).astype(np.float64)
    prior = counts / counts.sum()
    acc = float((test_y == int(np.argmax(counts))).mean())
    eps = 1e-12
    risk = float(-np.log(np.maximum(prior[test_y], eps)).mean())
    return {"acc": acc, "risk": risk}


