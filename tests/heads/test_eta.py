"""mmkernels.eta.refit_quality: the table, its reference, the signs of eta and gamma, errors."""

from __future__ import annotations

import math

import pytest
import torch

import mmkernels  # noqa: F401
from mmkernels import eta, heads

SUBSETS = [(0,), (1,), (0, 1)]


def _masking_encoder(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Subset s sees its modalities' columns, zeros elsewhere: [3, r, 5]."""
    x = torch.cat(chunks, 1)
    keep = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=x.dtype)
    return x.unsqueeze(0) * keep.unsqueeze(1)


def _data(n: int, seed: int, task: str):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 3, generator=g, dtype=torch.float64),
          torch.randn(n, 2, generator=g, dtype=torch.float64)]
    signal = xs[0][:, 0] + 0.5 * xs[1][:, 1]
    y = (signal > 0).long() if task == "classification" else signal
    return xs, y


@pytest.fixture(scope="module")
def cls_table():
    train_xs, train_y = _data(300, 0, "classification")
    test_xs, test_y = _data(200, 1, "classification")
    table = eta.refit_quality(_masking_encoder, train_xs, train_y, test_xs, test_y,
                              task="classification", subsets=SUBSETS, pairs=[("B", "A")],
                              l2=None)
    return table, (train_xs, train_y, test_xs, test_y)


def test_rows_match_direct_refits(cls_table):
    table, (train_xs, train_y, test_xs, test_y) = cls_table
    z_tr, z_te = _masking_encoder(train_xs), _masking_encoder(test_xs)
    fitted = heads.fit(z_tr, train_y, task="classification")
    risk, acc = fitted.risk(z_te, test_y), fitted.accuracy(z_te, test_y)
    assert [r["subset"] for r in table.rows] == ["A", "B", "AB"]
    for i, row in enumerate(table.rows):
        assert row["test_risk"] == pytest.approx(risk[i].item(), rel=1e-9)
        assert row["test_accuracy"] == pytest.approx(acc[i].item())
        assert row["train_risk"] == pytest.approx(fitted.risk(z_tr, train_y)[i].item(), rel=1e-9)
        assert row["converged"]


def test_eta_reference_is_the_full_subset_and_said(cls_table):
    table, _ = cls_table
    full = table.rows[2]["test_risk"]
    assert table.reference_risk == full and "subset AB" in table.reference
    for row in table.rows:
        assert row["eta"] == pytest.approx(row["test_risk"] - full)
    assert table.rows[2]["eta"] == 0.0


def test_gamma_signs(cls_table):
    table, _ = cls_table
    rows = {r["subset"]: r for r in table.rows}
    pairs = {(p["M"], p["N"]): p for p in table.pairs}
    assert set(pairs) == {("A", "AB"), ("B", "AB"), ("B", "A")}  # nested pairs + the asked one
    for (m, n), p in pairs.items():
        assert p["gamma_loss"] == pytest.approx(rows[m]["test_risk"] - rows[n]["test_risk"])
        assert p["gamma_acc_points"] == pytest.approx(
            100 * (rows[m]["test_accuracy"] - rows[n]["test_accuracy"]))
        assert p["nested"] == (n == "AB")
    # The full subset is better: gamma(A, AB) > 0 in loss units, < 0 in accuracy points.
    assert pairs[("A", "AB")]["gamma_loss"] > 0 > pairs[("A", "AB")]["gamma_acc_points"]


def test_reports_state_reference_and_signs(cls_table):
    table, _ = cls_table
    md = table.to_markdown()
    assert "eta reference: refit test risk of subset AB" in md
    assert "negative = M better" in md and "positive = M better" in md
    assert "| A | AB | True |" in md
    csv_rows = table.to_csv("subsets").splitlines()
    assert csv_rows[0].startswith("# task: classification") and "negative = M better" in csv_rows[0]
    assert csv_rows[1].startswith("subset,modalities,train_risk")
    assert table.to_csv("pairs").splitlines()[1] == "M,N,nested,gamma_loss,gamma_acc_points"
    with pytest.raises(ValueError, match="table must be 'subsets' or 'pairs'"):
        table.to_csv("other")


def test_regression_with_bayes_risk_and_streaming():
    train_xs, train_y = _data(200, 2, "regression")
    test_xs, test_y = _data(100, 3, "regression")
    table = eta.refit_quality(_masking_encoder, train_xs, train_y, test_xs, test_y,
                              task="regression", subsets=SUBSETS, bayes_risk=0.0)
    assert table.reference == "Bayes risk (given)" and table.reference_risk == 0.0
    assert table.rows[2]["test_risk"] < 1e-10          # y is linear in the full subset
    assert all(r["eta"] == r["test_risk"] for r in table.rows)
    assert all(r["test_accuracy"] is None for r in table.rows)
    assert all(p["gamma_acc_points"] is None for p in table.pairs)
    # A budget of ~10 rows per chunk gives the same table.
    small = eta.refit_quality(_masking_encoder, train_xs, train_y, test_xs, test_y,
                              task="regression", subsets=SUBSETS, bayes_risk=0.0,
                              memory_budget=10 * 3 * 5 * 12)
    for a, b in zip(table.rows, small.rows, strict=True):
        assert a["test_risk"] == pytest.approx(b["test_risk"], rel=1e-6, abs=1e-12)


def test_reference_by_name_and_default_names():
    train_xs, train_y = _data(120, 4, "regression")
    table = eta.refit_quality(_masking_encoder, train_xs, train_y, train_xs, train_y,
                              task="regression", reference="B")
    assert [r["subset"] for r in table.rows] == ["A", "B", "AB"]   # all_subsets(2) by default
    assert table.rows[1]["eta"] == 0.0 and "subset B" in table.reference


@pytest.mark.parametrize("kw, message", [
    (dict(task="ranking"), "task must be 'regression' or 'classification'"),
    (dict(subsets=[]), "subsets must not be empty"),
    (dict(subsets=[(0,), (2,)]), r"subsets entry \(2,\) must name modalities in 0..1"),
    (dict(subsets=[(0,), (1,), (0, 1), (1,)], names=list("ABCD")),
     "encoder returns S = 3 subsets, expected 4"),
    (dict(names=["x"]), "names has 1 entries, expected 3"),
    (dict(pairs=[("A", "Z")]), r"pairs names subset 'Z', which is not among"),
    (dict(reference=(0, 2)), r"reference names subset \(0, 2\)"),
    (dict(bayes_risk=float("nan")), "bayes_risk must be finite"),
])
def test_argument_messages(kw, message):
    xs, y = _data(20, 5, "regression")
    args = dict(task="regression")
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        eta.refit_quality(_masking_encoder, xs, y, xs, y, **args)


def test_no_full_subset_needs_a_reference():
    xs, y = _data(20, 5, "regression")
    two = lambda chunks: _masking_encoder(chunks)[:2]  # noqa: E731
    with pytest.raises(ValueError, match="no subset holds every modality and no bayes_risk"):
        eta.refit_quality(two, xs, y, xs, y, task="regression", subsets=[(0,), (1,)])
    table = eta.refit_quality(two, xs, y, xs, y, task="regression", subsets=[(0,), (1,)],
                              bayes_risk=0.1)
    assert table.pairs == [] and table.rows[0]["eta"] == table.rows[0]["test_risk"] - 0.1


def test_modality_count_mismatch():
    xs, y = _data(20, 5, "regression")
    with pytest.raises(ValueError, match="test_xs has 1 modalities, expected 2"):
        eta.refit_quality(_masking_encoder, xs, y, xs[:1], y, task="regression")
    with pytest.raises(ValueError, match="train_xs must hold at least one modality"):
        eta.refit_quality(_masking_encoder, [], y, [], y, task="regression")


def test_a_test_class_missing_from_training_gets_a_head_column():
    """Found by the fuzzer: label 2 only in test_y used to fail in Heads.risk."""
    gen = torch.Generator().manual_seed(0)
    xs_tr, xs_te = [torch.randn(30, 3, generator=gen)], [torch.randn(9, 3, generator=gen)]
    table = eta.refit_quality(lambda xs: xs[0].unsqueeze(0), xs_tr, torch.arange(30) % 2,
                              xs_te, torch.arange(9) % 3, task="classification",
                              subsets=[(0,)])
    row = table.rows[0]
    assert math.isfinite(row["test_risk"]) and row["test_accuracy"] <= 6 / 9


# ---- the data flow: blocks, encode once, dicts and masks, cross-validated l2 ---------------------


def _late_model(dims=(3, 2, 4), hidden=4, classes=3, n=120, seed=0):
    from mmkernels.nn import SubsetEnsemble
    from mmkernels.training import fit

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    xs = [torch.randn(n, d, generator=g) + 0.8 * y[:, None] * (k == 0) for k, d in
          enumerate(dims)]
    model = SubsetEnsemble(list(dims), hidden, classes, fusion="late", seed=seed)
    fit(model, xs, y, epochs=3, batch_size=64, progress=False)
    return model, xs, y


def test_late_fusion_z_is_refitted_at_each_subsets_own_width(monkeypatch):
    """A late-fusion SubsetEnsemble's latents are recognised: subset s is refitted on its own
    modalities' blocks only (m * H wide), which equals the refit on the padded Z (the padding
    is zero) at the rounding level, with the same l2."""
    model, xs, y = _late_model()
    compact = eta.refit_quality(model.latents, xs, y, xs, y, task="classification", l2=1.0)
    padded = eta.refit_quality(lambda x: model.latents(x), xs, y, xs, y,
                               task="classification", l2=1.0)
    for a, b in zip(compact.rows, padded.rows, strict=True):
        assert a["test_risk"] == pytest.approx(b["test_risk"], rel=1e-3, abs=1e-4)
    seen = []
    heads_fit = heads.fit

    def spy(z, *a, **k):
        if isinstance(z, heads.GroupedZ):
            seen.append(z.widths)
        return heads_fit(z, *a, **k)

    monkeypatch.setattr(heads, "fit", spy)
    eta.refit_quality(model.latents, xs, y, xs, y, task="classification", l2=1.0)
    assert seen == [[4, 4, 4, 8, 8, 8, 12]]                 # H = 4 per modality
    with pytest.raises(ValueError, match="blocks must give 3 block widths"):
        eta.refit_quality(model.latents, xs, y, xs, y, task="classification", blocks=[4, 8])


def test_the_encoder_runs_once_per_row_whatever_the_solver_does():
    """The refit encodes the training and the test rows once each (in chunks), then every
    solver iteration reads the encoded Z: it used to re-encode Z at every L-BFGS evaluation
    when Z did not fit the budget (20+ minutes on a 6-view dataset)."""
    model, xs, y = _late_model(n=200)
    rows = []

    def encoder(x):
        rows.append(len(x[0]))
        return model.latents(x)

    budget = 7 * 200 * 12 * 4  # far below Z: ~10 chunks and a memory-mapped spill
    table = eta.refit_quality(encoder, xs, y, xs[:], y, task="classification", l2=0.01,
                              blocks=[4, 4, 4], memory_budget=budget)
    assert max(r["converged"] for r in table.rows)
    assert sum(rows[1:]) == 2 * 200 + 2 and max(rows) < 200  # probes of 2 rows, then one pass
    cv_rows = []
    eta.refit_quality(lambda x: cv_rows.append(len(x[0])) or model.latents(x), xs, y, xs, y,
                      task="classification", blocks=[4, 4, 4])
    assert sum(cv_rows) == 2 * (200 + 2)                     # cross-validation: still once


def test_dict_modalities_and_presence_masks():
    """Dicts work like lists in the modules' order; with a mask, absent features never reach
    a result: garbage (NaN, huge) in absent rows gives the table of zeros there."""
    from mmkernels.nn import SubsetEnsemble

    g = torch.Generator().manual_seed(3)
    n = 90
    y = torch.arange(n) % 2
    xs = {"text": torch.randn(n, 3, generator=g) + y[:, None],
          "audio": torch.randn(n, 2, generator=g)}
    mask = torch.rand(n, 2, generator=g) < 0.7
    model = SubsetEnsemble({"text": 3, "audio": 2}, 4, 2, fusion="late")
    as_list = eta.refit_quality(model.latents, list(xs.values()), y, list(xs.values()), y,
                                task="classification", train_mask=mask, test_mask=mask, l2=1.0)
    as_dict = eta.refit_quality(model.latents, xs, y, xs, y, task="classification",
                                train_mask=mask, test_mask=mask, l2=1.0)
    assert [r["subset"] for r in as_dict.rows] == ["T", "A", "TA"]
    assert [r["test_risk"] for r in as_dict.rows] == [r["test_risk"] for r in as_list.rows]
    zeroed = {k: v * mask[:, i:i + 1] for i, (k, v) in enumerate(xs.items())}
    garbage = {k: torch.where(mask[:, i:i + 1], v, torch.full_like(v, 1e30 if i else
                                                                     float("nan")))
               for i, (k, v) in enumerate(xs.items())}
    a = eta.refit_quality(model.latents, zeroed, y, zeroed, y, task="classification",
                          train_mask=mask, test_mask=mask, l2=1.0)
    b = eta.refit_quality(model.latents, garbage, y, garbage, y, task="classification",
                          train_mask={"text": mask[:, 0], "audio": mask[:, 1]},
                          test_mask=mask, l2=1.0)
    assert [r["test_risk"] for r in a.rows] == [r["test_risk"] for r in b.rows]
    unmasked = eta.refit_quality(model.latents, zeroed, y, zeroed, y, task="classification",
                                 l2=1.0)
    assert unmasked.rows[1]["test_risk"] != a.rows[1]["test_risk"]  # the mask is used
    with pytest.raises(ValueError, match=r"test_xs must name the modalities of train_xs"):
        eta.refit_quality(model.latents, xs, y, {"audio": xs["audio"], "text": xs["text"]}, y,
                          task="classification")


def test_cross_validated_l2_is_the_default_and_reported():
    train_xs, train_y = _data(300, 0, "classification")
    test_xs, test_y = _data(200, 1, "classification")
    table = eta.refit_quality(_masking_encoder, train_xs, train_y, test_xs, test_y,
                              task="classification", subsets=SUBSETS)
    z = _masking_encoder(train_xs)
    fold = heads.kfold(train_y, 5)
    order = torch.argsort(fold, stable=True)
    ref = heads.select_l2(z[:, order], train_y[order], task="classification",
                          folds=fold[order])
    assert [r["l2"] for r in table.rows] == ref.l2.tolist()
    assert [r["cv_risk"] for r in table.rows] == pytest.approx(ref.score.min(1).values.tolist())
    assert "Head l2: chosen per subset by 5-fold cross-validation on the training rows" in \
        table.to_markdown()
    fixed = eta.refit_quality(_masking_encoder, train_xs, train_y, test_xs, test_y,
                              task="classification", subsets=SUBSETS, l2=2.5)
    assert {r["l2"] for r in fixed.rows} == {2.5} and fixed.rows[0]["cv_risk"] is None
    assert "Head l2: fixed, 2.5 for every subset" in fixed.header()
    with pytest.raises(ValueError, match="l2 must be 'cv', a float >= 0 or None"):
        eta.refit_quality(_masking_encoder, train_xs, train_y, test_xs, test_y,
                          task="classification", l2="auto")
    with pytest.raises(ValueError, match=r"l2='cv' needs at least 2 training rows"):
        eta.refit_quality(_masking_encoder, [x[:1] for x in train_xs], train_y[:1], test_xs,
                          test_y, task="classification", subsets=SUBSETS)
