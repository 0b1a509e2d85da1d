"""Modality subsets: enumeration, boolean masks and short names such as "TVA".

Subsets are ordered by size, then lexicographically by modality index, so the unimodal
subsets come first and the full set last: for K = 3, {0}, {1}, {2}, {0,1}, {0,2}, {1,2}, {0,1,2}.

Names follow one rule everywhere in the package (modules, refit tables, sweeps, reports): each
modality gets a label (:func:`modality_labels`) and a subset's name joins its modalities'
labels in modality order (:func:`subset_name`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations

import torch

__all__ = ["all_subsets", "subset_mask", "modality_labels", "subset_name", "is_subset"]


def all_subsets(num_modalities: int, *, min_size: int = 1) -> list[tuple[int, ...]]:
    """Every subset of range(num_modalities) with at least min_size members."""
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    return [
        combo
        for size in range(max(min_size, 1), num_modalities + 1)
        for combo in combinations(range(num_modalities), size)
    ]


def subset_mask(
    subsets: Iterable[Sequence[int]], num_modalities: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool [S, K] mask; row s is True at the modalities of subsets[s]."""
    rows = [tuple(s) for s in subsets]
    if not rows:
        raise ValueError("subsets must not be empty")
    mask = torch.zeros(len(rows), num_modalities, dtype=torch.bool)
    for i, row in enumerate(rows):
        for k in row:
            if not 0 <= k < num_modalities:
                raise ValueError(
                    f"subset {row} names modality {k}, expected 0..{num_modalities - 1}"
                )
            mask[i, k] = True
    return mask.to(device)


def modality_labels(modalities: Sequence[str] | int) -> list[str]:
    """One short label per modality.

    Names (e.g. ``["text", "audio", "visual"]``) are labelled by their upper-case first letters
    when those are unique (T, A, V), else by the names themselves; a count K of unnamed
    modalities gets the letters A, B, C, ... (K <= 26).
    """
    if isinstance(modalities, int):
        if not 1 <= modalities <= 26:
            raise ValueError(f"unnamed modalities are labelled A..Z: 1 to 26 of them, got "
                             f"{modalities}")
        return [chr(ord("A") + k) for k in range(modalities)]
    names = [str(n) for n in modalities]
    first = [n[:1].upper() for n in names]
    return first if all(first) and len(set(first)) == len(first) else names


def subset_name(subset: Sequence[int], labels: Sequence[str]) -> str:
    """The labels of the subset's modalities in modality order: "TV" from labels T, A, V, or
    "top+left" when a label is longer than one character."""
    parts = [labels[k] for k in sorted(subset)]
    return "".join(parts) if all(len(p) == 1 for p in labels) else "+".join(parts)


def is_subset(small: Sequence[int], large: Sequence[int]) -> bool:
    """True when every modality of small is in large."""
    return set(small) <= set(large)
