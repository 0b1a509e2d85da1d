"""`mmkernels bench heads`' op-rate section runs (at a tiny size) and reports every runner."""

import math

from mmkernels.experiments.bench.heads import lbfgs_direction_rates, softmax_group_rates


def test_softmax_group_rates_reports_every_runner():
    rates = softmax_group_rates(8, rounds=1, n=40, C=3, problems=4, per_subset=2)
    assert set(rates) == {"op_distinct_subsets_gflops", "op_side_by_side_gflops",
                          "mm_N3_gflops", "mm_N6_gflops"}
    assert all(math.isfinite(v) and v > 0 for v in rates.values())


def test_lbfgs_direction_rates_reports_every_runner():
    rates = lbfgs_direction_rates(3, 20, 2, rounds=1)
    assert set(rates) == {"op_gb_per_s", "tensor_ops_gb_per_s", "sum_once_gb_per_s"}
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
