"""Modality subsets: enumeration, boolean masks and short names such as "TVA".

Subsets are ordered by size, then lexicographically by modality index, so the unimodal
subsets come first and the full set last: for K = 3, {0}, {1}, {2}, {0,1}, {0,2}, {1,2}, {0,1,2}.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations

import torch

__all__ = ["all_subsets", "subset_mask", "subset_name", "parse_subset", "is_subset"]


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


def subset_name(subset: Sequence[int], letters: Sequence[str]) -> str:
    """ "TVA"-style name: the letters of the subset's modalities, in modality order."""
    return "".join(letters[k] for k in sorted(subset))


def parse_subset(name: str, letters: Sequence[str]) -> tuple[int, ...]:
    """Inverse of subset_name: "TA" with letters "TAV" -> (0, 1)."""
    index = {letter: k for k, letter in enumerate(letters)}
    unknown = [c for c in name if c not in index]
    if unknown or not name:
        raise ValueError(f"subset name {name!r} must use the letters {''.join(letters)!r}")
    return tuple(sorted({index[c] for c in name}))


def is_subset(small: Sequence[int], large: Sequence[int]) -> bool:
    """True when every modality of small is in large."""
    return set(small) <= set(large)
