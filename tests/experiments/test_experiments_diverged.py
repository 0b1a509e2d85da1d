"""A cell whose training diverges is recorded as diverged (its subsets and epochs), reported
as such, never stored or tabulated as a result, and never breaks the report: not on the run
that diverged, not on a resume, not from a store an older version wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from test_experiments_tables import tiny_dataset

import mmkernels.training
from mmkernels.experiments.cli import main
from mmkernels.experiments.report import RealResult, write_results
from mmkernels.experiments.store import ResultStore, read_records
from mmkernels.experiments.sweep import SweepConfig, prepare, run_cell, run_sweep

OPTIONS = ["--seeds", "2", "--epochs", "3", "--hidden", "4", "--fractions", "0.5", "1",
           "--no-progress"]


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_diverging_learning_rate_is_reported_not_stored(tmp_path: Path, capsys) -> None:
    data = tmp_path / "mine.npz"
    tiny_dataset(n=60).save(data)
    out = tmp_path / "out"
    assert main(["sweep", "--data", str(data), "--out", str(out), *OPTIONS, "--lr", "1e30"]) == 0
    err = capsys.readouterr().err
    assert "4 of 4 cells diverged" in err
    for rec in read_records(out):  # every cell recorded, as diverged, with no metric
        assert rec["records"]["subsets"] == [] and rec["records"]["refit"] == []
        got = rec["records"]["diverged"]
        assert {r["subset"] for r in got} == {"T", "A", "TA"}
        assert all(isinstance(r["epoch"], int) and 1 <= r["epoch"] <= 3 for r in got)
    text = (out / "report.md").read_text()
    assert "### Diverged cells" in text and "4 cell(s) diverged" in text
    assert "- fraction 1, seed 0: T (training loss, epoch" in text
    assert "not checked: every cell diverged" in text
    assert len(_rows(out / "mine_diverged.csv")) == 4 * 3
    assert not (out / "mine_subsets_per_seed.csv").exists()
    # Resuming from those records reports the same, and still writes the report.
    (out / "report.md").unlink()
    assert main(["sweep", "--resume", str(out), "--no-progress"]) == 0
    assert "### Diverged cells" in (out / "report.md").read_text()


def _diverge(monkeypatch, seeds: set[int], subset: int, *, history: bool) -> None:
    """fit() as usual, then subset ``subset`` of the cells of ``seeds`` diverged: a NaN
    parameter after the last step, or (history) a NaN training loss in epoch 2."""
    real = mmkernels.training.fit

    def fit(model, *args, **kw):
        res = real(model, *args, **kw)
        if kw["seed"] in seeds:
            with torch.no_grad():
                next(iter(model.parameters()))[subset].fill_(float("nan"))
            if history:
                res.history["train_loss"][1, subset] = float("nan")
        return res

    monkeypatch.setattr(mmkernels.training, "fit", fit)


@pytest.mark.parametrize("history, epoch, where", [(True, 2, "training loss"),
                                                   (False, 3, "parameters")])
def test_one_diverged_subset_makes_its_cell_diverged(monkeypatch, history, epoch,
                                                     where) -> None:
    data = prepare(tiny_dataset(n=60), "tiny")
    cfg = SweepConfig(hidden=4, epochs=3, seeds=[0], fractions=[1.0])
    _diverge(monkeypatch, {0}, 1, history=history)
    out = run_cell(data, 0, 1.0, cfg)
    assert out["subsets"] == out["refit"] == out["pairs"] == out["probe"] == []
    assert out["diverged"] == [{"dataset": "tiny", "seed": 0, "fraction": 1.0, "n_train": 42,
                                "subset": "A", "epoch": epoch, "detected_in": where}]


def test_report_with_some_cells_diverged(tmp_path: Path, monkeypatch) -> None:
    data = prepare(tiny_dataset(n=60), "tiny")
    cfg = SweepConfig(hidden=4, epochs=2, seeds=[0, 1], fractions=[0.5, 1.0])
    _diverge(monkeypatch, {1}, 2, history=False)
    recs = run_sweep(data, cfg, progress=False, store=tmp_path / "store")
    assert {(r["seed"], r["fraction"]) for r in recs["diverged"]} == {(1, 0.5), (1, 1.0)}
    assert {r["seed"] for r in recs["subsets"]} == {0}
    report = write_results(tmp_path / "out", real=[RealResult(data, cfg, recs)])
    text = report.read_text()
    assert "- fraction 0.5, seed 1: TA (parameters, epoch 2)" in text
    shapley = _rows(tmp_path / "out" / "tiny_shapley.csv")
    assert shapley and {r["n_seeds"] for r in shapley} == {"1"}


def test_a_store_with_nan_metrics_from_an_older_version(tmp_path: Path) -> None:
    """Older versions stored a diverged cell's NaN losses as null; the Shapley table then
    raised TypeError and report.md was never written, on every resume."""
    data = prepare(tiny_dataset(n=60), "tiny")
    cfg = SweepConfig(hidden=4, epochs=1, seeds=[0, 1], fractions=[1.0], probe=False)
    run_sweep(data, cfg, progress=False, store=tmp_path / "old")
    with ResultStore(tmp_path / "legacy").writer() as w:
        for rec in read_records(tmp_path / "old"):
            body = json.loads(json.dumps(rec))
            body.pop("sha256")
            body["records"].pop("diverged")
            if rec["seed"] == 1:
                for row in body["records"]["subsets"]:
                    row["test_loss"] = row["train_loss"] = None  # NaN, as JSON
            w.append(body)
    recs = run_sweep(data, cfg, progress=False, store=tmp_path / "legacy")
    assert {r["seed"] for r in recs["subsets"]} == {0}
    assert {r["subset"] for r in recs["diverged"]} == {"T", "A", "TA"}
    assert {r["detected_in"] for r in recs["diverged"]} == {"stored loss"}
    report = write_results(tmp_path / "out", real=[RealResult(data, cfg, recs)])
    assert "- fraction 1, seed 1: T (stored loss)" in report.read_text()
