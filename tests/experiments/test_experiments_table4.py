"""Table 4 (synthetic overlap): the ridge refit reproduces MSE = dim (K - k)(1 - w)^2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmkernels.experiments.table4 import (
    PAPER_TABLE4,
    check_table4,
    formula_mse,
    ridge_subset_mse,
    run_table4,
)


def test_small_table4_matches_formula() -> None:
    # dim 20 and 2,000 rows: the ridge's O(d/n) excess is at most ~3%; tolerance 10%.
    rows = run_table4(seeds=(0, 1), n_train=2000, n_test=1000, dim=20, progress=False)
    chain = {"{1}": 1, "{1,2}": 2, "{1,2,3}": 3, "{1,2,3,4}": 4}
    for w in (1.0, 0.8, 0.5, 0.2, 0.0):
        for name, k in chain.items():
            mse = np.mean([r["test_mse"] for r in rows if r["subset"] == name and r["w"] == w])
            want = formula_mse(k, w, dim=20)
            if want == 0:
                assert mse < 0.01 * formula_mse(1, 0.0, dim=20)
            else:
                assert mse == pytest.approx(want, rel=0.10)
    # every subset is present and the Bayes risk is recorded
    assert len({r["subset"] for r in rows}) == 15
    r = next(r for r in rows if r["subset"] == "{2}" and r["w"] == 0.5)
    assert r["formula_mse"] is None and r["bayes_risk"] > 0


def test_check_table4_rule() -> None:
    rows = [{"subset": "{" + ",".join(str(k + 1) for k in sub) + "}", "w": w, "test_mse": v}
            for (sub, w), v in PAPER_TABLE4.items()]
    assert all(c["ok"] for c in check_table4(rows))
    bad = [dict(r, test_mse=r["test_mse"] * 1.2 + (5.0 if r["test_mse"] == 0 else 0))
           for r in rows]
    assert not any(c["ok"] for c in check_table4(bad))


def test_ridge_matches_heads_fit() -> None:
    from mmkernels import heads

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(200, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    y = xs[0].sum(1) + 0.5 * xs[1][:, 0] + 0.1 * torch.randn(200, generator=gen,
                                                             dtype=torch.float64)
    xt = [torch.randn(100, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    yt = xt[0].sum(1) + 0.5 * xt[1][:, 0]
    ours = ridge_subset_mse([x.numpy() for x in xs], y.numpy(), [x.numpy() for x in xt],
                            yt.numpy(), [(0, 1)])[0]
    fitted = heads.fit(torch.cat(xs, 1)[None], y, task="regression")
    theirs = float(fitted.risk(torch.cat(xt, 1)[None], yt)[0])
    assert ours == pytest.approx(theirs, rel=1e-4)
