"""The fused CUDA kernels (csrc/cuda/*.cuh), forward and backward, run through the host emulator
(no GPU) against mmkernels.reference: shapes with tails, masks (all-absent rows and tiles, NaN in
absent rows), S = 1..15 subsets, every dtype and math path (bf16 and f16 on mma.sync, float32
on TF32 mma and on SIMT FMA, float64 SIMT), unaligned and strided inputs; every output and
gradient element poisoned beforehand and checked."""

from __future__ import annotations

import pytest
import torch
from cuda_cases import Case, run_case
from hypothesis import given, settings
from hypothesis import strategies as st

# (dtype, tf32): the five math paths of the kernels.
PATHS = [
    (torch.bfloat16, False),
    (torch.float16, False),
    (torch.float32, True),
    (torch.float32, False),
    (torch.float64, False),
]


@st.composite
def cases(draw, late: bool) -> Case:
    K = draw(st.integers(1, 4))
    dims = draw(st.lists(st.integers(1, 80), min_size=K, max_size=K))
    layout = draw(st.sampled_from(["plain", "shared_subsets", "per_subset"]))
    num_subsets = None if layout == "plain" else draw(st.integers(1, 15))
    if late:
        widths = draw(st.lists(st.integers(1, 40), min_size=K, max_size=K))
    else:
        widths = [draw(st.integers(1, 80))]
    dtype, tf32 = draw(st.sampled_from(PATHS))
    present = draw(st.sampled_from([None, 0.0, 0.5, 0.9, "tiles"]))
    return Case(
        late=late,
        dims=dims,
        batch=draw(st.sampled_from([0, 1, 17, 64, 65, 130])),
        widths=widths,
        num_subsets=num_subsets,
        per_subset=layout == "per_subset",
        present=present,
        bias=draw(st.booleans()),
        relu=draw(st.booleans()),
        dtype=dtype,
        tf32=tf32,
        seed=draw(st.integers(0, 2**31 - 1)),
        nan_absent=present is not None and draw(st.booleans()),
        strided=draw(st.booleans()),
    )


@settings(max_examples=40, deadline=None)
@given(cases(late=False))
def test_concat_project_kernels_match_reference(case: Case) -> None:
    run_case(case, check=True)


@settings(max_examples=40, deadline=None)
@given(cases(late=True))
def test_project_concat_kernels_match_reference(case: Case) -> None:
    run_case(case, check=True)


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("dtype,tf32", PATHS)
def test_one_weight_under_fifteen_subsets(late: bool, dtype: torch.dtype, tf32: bool) -> None:
    """The 15 subsets of 4 modalities sharing one weight: concat keeps four partial products
    on chip and emits every subset from them; project emits each modality's block 15 times."""
    widths = [24, 8, 33, 16] if late else [70]
    case = Case(late, [20, 7, 33, 64], 130, widths, 15, False, "tiles", True, True, dtype, tf32, 5,
                nan_absent=True)
    run_case(case, check=True)


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("dtype,tf32", PATHS)
def test_per_subset_weights_with_nan_in_absent_rows(
    late: bool, dtype: torch.dtype, tf32: bool
) -> None:
    widths = [9, 40, 1] if late else [65]
    case = Case(late, [100, 3, 65], 130, widths, 7, True, 0.5, True, False, dtype, tf32, 9,
                nan_absent=True, strided=True)
    run_case(case, check=True)


@pytest.mark.parametrize("dtype,tf32", PATHS)
def test_more_than_four_modalities_under_subsets(dtype: torch.dtype, tf32: bool) -> None:
    """K > 4 with one shared weight: one launch over (subset, tile) pairs instead."""
    case = Case(False, [3, 9, 17, 2, 30, 8], 65, [20], 9, False, 0.8, True, True, dtype, tf32, 3)
    run_case(case, check=True)


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("per_subset", [False, True])
def test_no_subsets_at_all(late: bool, per_subset: bool) -> None:
    """subset_mask [0, K]: an empty output, and zero weight and bias gradients."""
    widths = [5, 6] if late else [7]
    case = Case(late, [3, 9], 17, widths, 0, per_subset, 0.5, True, True, torch.float32, False, 2)
    run_case(case, check=True)
