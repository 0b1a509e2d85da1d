"""Training-set fractions (Table 2): the stratified subsampling rule.

The paper does not publish how it drew 1e-4 of the training set (one or two samples). The
rule used here, for classification labels y with n rows and a fraction f in (0, 1]:

1. target size m = max(round(f * n), 1);
2. every class present in y gets at least one sample ("at least one sample per class where
   possible": a class with no training row cannot be sampled), so m = max(m, #classes);
3. the remaining m - #classes samples are allocated to the classes in proportion to their
   counts (largest-remainder rounding of (m - #classes) * n_c / n, capped at n_c - 1 each so
   no class is asked for more rows than it has; leftovers go to the classes with room, in
   order of remaining room);
4. within each class the rows are drawn uniformly without replacement with a
   numpy Generator seeded by ``seed``.

f = 1 returns every row. For regression (``y=None`` stratification) it is a plain uniform
draw of m = max(round(f * n), 1) rows. Indices are returned sorted.
"""

from __future__ import annotations

import numpy as np

__all__ = ["stratified_fraction", "SAMPLING_RULE"]

SAMPLING_RULE = (
    "stratified: m = max(round(f*n), 1) rows, raised to the number of classes so every class "
    "present gets at least one row; the rest allocated in proportion to class counts "
    "(largest remainder); rows drawn uniformly within each class with a seeded generator; "
    "f = 1 uses every row"
)


def stratified_fraction(
    y: np.ndarray | None, fraction: float, seed: int, *, n: int | None = None
) -> np.ndarray:
    """Sorted int64 row indices of a stratified ``fraction`` of the rows (see module doc).

    Args:
        y: int class labels [n], or None for an unstratified (regression) draw of n rows.
        fraction: in (0, 1].
        seed: seeds the draw.
        n: number of rows when y is None.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    if y is None:
        if n is None:
            raise ValueError("give y or n")
        m = max(int(round(fraction * n)), 1)
        if fraction >= 1.0:
            return np.arange(n, dtype=np.int64)
        return np.sort(rng.choice(n, size=min(m, n), replace=False)).astype(np.int64)
    y = np.asarray(y)
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("y must have at least one row")
    if fraction >= 1.0:
        return np.arange(n, dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    c = len(classes)
    m = min(max(int(round(fraction * n)), 1, c), n)
    extra = m - c
    room = counts - 1
    share = extra * counts / n
    alloc = np.minimum(np.floor(share).astype(np.int64), room)
    left = extra - int(alloc.sum())
    if left > 0:
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        for i in order:
            if left == 0:
                break
            if alloc[i] < room[i]:
                alloc[i] += 1
                left -= 1
        while left > 0:  # caps bit: give to the classes with the most room left
            i = int(np.argmax(room - alloc))
            alloc[i] += 1
            left -= 1
    picks = []
    for cls, k in zip(classes, alloc + 1, strict=True):
        rows = np.flatnonzero(y == cls)
        picks.append(rng.choice(rows, size=int(k), replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)
