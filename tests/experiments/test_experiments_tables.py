"""Sweep cells and aggregated tables on tiny data (fast)."""

from __future__ import annotations

import numpy as np
import pytest

from mmkernels.experiments import sweep, tables
from mmkernels.experiments.data import MultiModalDataset
from mmkernels.experiments.store import read_records
from mmkernels.experiments.sweep import SweepConfig, prepare, run_sweep
from mmkernels.subsets import modality_labels


def tiny_dataset(n: int = 90, seed: int = 0) -> MultiModalDataset:
    """3 classes, 2 informative modalities ("text", "audio"), train/test split."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centers = rng.normal(size=(3, 4)) * 2
    mods = {name: (centers[y] + rng.normal(size=(n, 4))).astype(np.float32)
            for name in ("text", "audio")}
    split = np.where(np.arange(n) < int(0.7 * n), "train", "test")
    return MultiModalDataset(mods, y, task="classification", split=split)


def test_sweep_records_and_tables() -> None:
    data = prepare(tiny_dataset(), "tiny")
    assert data.subset_names == ["T", "A", "TA"]
    cfg = SweepConfig(hidden=8, epochs=3, seeds=[0, 1], fractions=[0.1, 1.0])
    rec = run_sweep(data, cfg, progress=False)
    assert len(rec["subsets"]) == 2 * 2 * 3
    assert len(rec["pairs"]) == 2 * 2  # TA > T, TA > A per seed, at fraction 1 only
    assert len(rec["probe"]) == 2 * 2  # one per modality per seed
    assert {r["n_train"] for r in rec["subsets"] if r["fraction"] == 0.1} == {6}
    t1 = tables.table1(rec["subsets"])
    assert [r["subset"] for r in t1] == ["T", "A", "TA"]
    accs = [100 * r["test_acc"] for r in rec["subsets"]
            if r["subset"] == "TA" and r["fraction"] == 1.0]
    ta = t1[2]
    assert ta["test_acc_mean"] == pytest.approx(np.mean(accs))
    assert ta["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    t2 = tables.table2(rec["subsets"])
    assert len(t2) == 6
    assert {r["n_train_mean"] for r in t2} == {6.0, 62.0}  # counts are not scaled to %
    t3 = tables.table3(rec["pairs"])
    assert {(r["M"], r["N"]) for r in t3} == {("TA", "T"), ("TA", "A")}
    pair = next(p for p in rec["pairs"] if p["N"] == "T" and p["seed"] == 0)
    refit = {r["subset"]: r for r in rec["refit"] if r["seed"] == 0}
    assert pair["gamma_loss"] == pytest.approx(
        refit["TA"]["refit_test_risk"] - refit["T"]["refit_test_risk"])
    md = tables.pivot_markdown(t2, "subset", "fraction", "test_acc")
    assert "±" in md and md.count("\n") == 2 + 3
    shap, empty = tables.shapley_table(
        rec["subsets"], data.modality_names, dict(zip(data.subset_names, data.subsets,
                                                      strict=True)).__getitem__,
        data.train_y.numpy(), data.test_y.numpy(), "classification", 3)
    full = next(r for r in t1 if r["subset"] == "TA")["test_acc_mean"]
    total = sum(r["shapley_acc_points_mean"] for r in shap if r["fraction"] == 1.0)
    assert total == pytest.approx(full - 100 * empty["acc"])


def test_aggregate_and_labels() -> None:
    rows = [{"g": "a", "v": 1.0}, {"g": "a", "v": 3.0}, {"g": "b", "v": None}]
    agg = tables.aggregate(rows, ["g"], ["v"], scale=2.0)
    assert agg[0] == {"g": "a", "n_seeds": 2, "v_mean": 4.0, "v_std": pytest.approx(2.8284271)}
    assert agg[1]["v_mean"] is None
    assert modality_labels(["text", "audio", "visual"]) == ["T", "A", "V"]
    assert modality_labels(["TL", "TR"]) == ["TL", "TR"]
    assert tables.fmt_pm(1.234, 0.5) == "1.23 ± 0.50"


def test_sweep_resumes_from_store(tmp_path, monkeypatch) -> None:
    from mmkernels.experiments import sweep as sw

    data = prepare(tiny_dataset(n=45), "tiny")
    cfg = SweepConfig(hidden=4, epochs=1, seeds=[0], fractions=[0.5, 1.0], probe=False)
    first = sw.run_sweep(data, cfg, progress=False, store=tmp_path)
    assert len(read_records(tmp_path)) == 2

    def fail(*args, **kwargs):
        raise AssertionError("a stored cell was trained again")

    monkeypatch.setattr(sw, "run_cell", fail)
    again = sw.run_sweep(data, cfg, progress=False, store=tmp_path)
    assert again["subsets"] == first["subsets"] and again["pairs"] == first["pairs"]
    with pytest.raises(AssertionError, match="trained again"):  # changed setting: new key
        sw.run_sweep(data, SweepConfig(hidden=4, epochs=2, seeds=[0], fractions=[1.0]),
                     progress=False, store=tmp_path)


def test_sweep_on_an_executor_matches_in_process(tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = prepare(tiny_dataset(n=45), "tiny")
    cfg = SweepConfig(hidden=4, epochs=2, seeds=[0, 1], fractions=[1.0], probe=False)
    local = run_sweep(data, cfg, progress=False)
    with ThreadPoolExecutor(max_workers=1) as ex:
        remote = run_sweep(data, cfg, progress=False, executor=ex, store=tmp_path)
    assert remote["subsets"] == local["subsets"]
    assert len(read_records(tmp_path)) == 2


def tiny_regression(n: int = 60, seed: int = 0) -> MultiModalDataset:
    """A regression target from two modalities ("left", "right"), train/test split."""
    rng = np.random.default_rng(seed)
    mods = {name: rng.normal(size=(n, 3)).astype(np.float32) for name in ("left", "right")}
    y = (mods["left"][:, 0] + mods["right"][:, 1]).astype(np.float32)
    split = np.where(np.arange(n) < int(0.7 * n), "train", "test")
    return MultiModalDataset(mods, y, task="regression", split=split)


def test_cell_metrics_are_the_models_test_predictions_scored_once() -> None:
    from sklearn import metrics as skm

    from mmkernels.training import evaluate, fit

    data = prepare(tiny_dataset(), "tiny")
    model = sweep._model(data, SweepConfig(hidden=8), seed=0)
    fit(model, data.train_xs, data.train_y, epochs=3, batch_size=32, progress=False)
    got = sweep._test_metrics(model, data, chunk=7)  # several chunks of rows
    pred = model(data.test_xs).argmax(-1).numpy()
    y = data.test_y.numpy()
    for s in range(len(data.subsets)):
        assert float(got["accuracy"][s]) == pytest.approx(skm.accuracy_score(y, pred[s]))
        assert float(got["unweighted_accuracy"][s]) == pytest.approx(
            skm.balanced_accuracy_score(y, pred[s]))
        for avg in ("macro", "weighted"):
            assert float(got[f"f1_{avg}"][s]) == pytest.approx(
                skm.f1_score(y, pred[s], average=avg, zero_division=0))
    # The accuracy the trainer reports is the same number.
    acc = evaluate(model, data.test_xs, data.test_y)["acc"]
    np.testing.assert_allclose(got["accuracy"].numpy(), acc.numpy(), rtol=1e-12)
    assert model.training  # eval mode was only borrowed

    reg = prepare(tiny_regression(), "reg")
    model = sweep._model(reg, SweepConfig(hidden=8), seed=0)
    fit(model, reg.train_xs, reg.train_y, task="regression", epochs=3, progress=False)
    got = sweep._test_metrics(model, reg)
    out = model(reg.test_xs)[..., 0].detach().numpy()
    t = reg.test_y.numpy()
    for s in range(len(reg.subsets)):
        assert float(got["mae"][s]) == pytest.approx(skm.mean_absolute_error(t, out[s]))
        assert float(got["pearson"][s]) == pytest.approx(np.corrcoef(out[s], t)[0, 1])


def test_records_and_tables_carry_every_metric() -> None:
    data = prepare(tiny_dataset(n=45), "tiny")
    rec = run_sweep(data, SweepConfig(hidden=4, epochs=2, seeds=[0, 1], fractions=[1.0],
                                      probe=False), progress=False)
    shown = {m.key for m in tables.CLASSIFICATION_METRICS + tables.REGRESSION_METRICS}
    assert set(sweep.TEST_METRICS.values()) <= shown  # every recorded metric has a column
    for r in rec["subsets"]:
        for key in ("test_acc", "test_ua", "test_f1_macro", "test_f1_weighted"):
            assert 0.0 <= r[key] <= 1.0, key
        assert r["test_mae"] is None and r["test_pearson"] is None
    t1 = tables.table1(rec["subsets"])
    ua = [100 * r["test_ua"] for r in rec["subsets"] if r["subset"] == "TA"]
    assert t1[2]["test_ua_mean"] == pytest.approx(np.mean(ua))
    assert {f"{m.key}_mean" for m in tables.CLASSIFICATION_METRICS} <= set(t1[0])

    reg = prepare(tiny_regression(), "reg")
    rr = run_sweep(reg, SweepConfig(hidden=4, epochs=2, seeds=[0], fractions=[1.0],
                                    probe=False), progress=False)
    assert tables.metrics_of(rr["subsets"]) == tables.REGRESSION_METRICS
    assert all(r["test_acc"] is None and r["test_mae"] > 0 for r in rr["subsets"])
    assert {"test_mae_mean", "test_pearson_mean"} <= set(tables.table1(rr["subsets"])[0])


def test_eta_table_is_the_refit_risk_above_the_full_subsets() -> None:
    refit = [{"dataset": "d", "fraction": 1.0, "seed": s, "subset": n, "size": len(n),
              "refit_test_risk": risk + s, "refit_test_acc": acc}
             for s in (0, 1) for n, risk, acc in (("T", 0.9, 0.5), ("A", 0.7, 0.6),
                                                   ("TA", 0.4, 0.8))]
    eta = {r["subset"]: r for r in tables.eta_table(refit, "TA")}
    assert eta["T"]["eta_mean"] == pytest.approx(0.5) and eta["T"]["eta_std"] == pytest.approx(0)
    assert eta["TA"]["eta_mean"] == 0 and eta["A"]["refit_test_acc_mean"] == pytest.approx(60)
    assert eta["A"]["refit_test_risk_mean"] == pytest.approx(1.2) and eta["A"]["n_seeds"] == 2
