"""Results folder: atomic writes and the report's contents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_experiments_latex import check_structure
from test_experiments_tables import tiny_dataset, tiny_regression

from mmkernels.experiments import io as rio
from mmkernels.experiments.report import RealResult, write_results
from mmkernels.experiments.sweep import SweepConfig, prepare, run_sweep
from mmkernels.experiments.table4 import run_table4


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "r.json"
    rio.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def boom(src, dst):  # the rename "crashes": the old file must survive intact
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        rio.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind


def test_write_csv_and_jsonable(tmp_path: Path) -> None:
    rio.write_csv(tmp_path / "t.csv", [{"a": 1, "b": None}, {"a": 2, "c": 3.5}])
    assert (tmp_path / "t.csv").read_text() == "a,b,c\n1,,\n2,,3.5\n"
    assert rio.to_jsonable({"x": (1, float("nan"))}) == {"x": [1, None]}


def test_write_results_folder(tmp_path: Path) -> None:
    data = prepare(tiny_dataset(), "tiny")
    cfg = SweepConfig(hidden=8, epochs=2, seeds=[0, 1], fractions=[0.01, 1.0])
    rec = run_sweep(data, cfg, progress=False)
    t4 = run_table4(overlaps=(0.5, 0.0), seeds=(0,), n_train=300, n_test=100, dim=5,
                    progress=False)
    report = write_results(tmp_path, table4_rows=t4, real=[RealResult(data, cfg, rec)],
                           config={"cmd": "test"}, runtime_s=1.0)
    text = report.read_text()
    tables = [f"{t}.{ext}" for t in ("table4", "tiny_table1", "tiny_table2", "tiny_table3",
                                     "tiny_eta") for ext in ("csv", "md", "tex")]
    figs = [f"{f}.{ext}" for f in ("table4_mse", "tiny_accuracy_vs_fraction",
                                   "tiny_f1_macro_vs_fraction") for ext in ("png", "pdf", "svg")]
    for name in ("config.json", "claims.json", "tiny_shapley.csv", "tiny_laziness.csv",
                 "tiny_subsets_per_seed.csv", "tiny_per_seed.json", "tiny_unimodal.csv",
                 *tables, *figs):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "table4_mse.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "table4_mse.pdf").read_bytes()[:4] == b"%PDF"
    # The LaTeX tables: valid structure, 2 seeds stated, one line per subset / pair.
    ncols = {"table4": 3, "tiny_table1": 7, "tiny_table2": 3, "tiny_table3": 5,
             "tiny_eta": 4}
    nrows = {"table4": 4, "tiny_table1": 3, "tiny_table2": 3, "tiny_table3": 2,
             "tiny_eta": 3}
    for stem, k in ncols.items():
        tex = (tmp_path / f"{stem}.tex").read_text()
        assert len(check_structure(tex, k)) == nrows[stem], stem
        assert ("over 1 seed." if stem == "table4" else "over 2 seeds.") in tex, stem
        assert (tmp_path / f"{stem}.md").read_text().startswith("| "), stem
    t1 = (tmp_path / "tiny_table1.tex").read_text()
    for header in (r"accuracy WA (\%)", r"UA (\%)", r"macro F1 (\%)", r"weighted F1 (\%)",
                   "cross-entropy (nats)"):
        assert header in t1
    assert "Higher is better: accuracy WA" in t1 and "Lower is better: cross-entropy" in t1
    t4 = (tmp_path / "table4.tex").read_text()
    assert "$w = 0.5$ & $w = 0.0$" in t4 and r"\{1,2,3,4\}" in t4
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert "torch" in cfg_json["versions"] and cfg_json["cmd"] == "test"
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert any("gamma" in c["claim"] for c in claims)
    assert all(c["holds"] in (True, False) for c in claims)
    for c in claims:
        assert ("**holds**" in text) or ("**does not hold**" in text)
        assert c["detail"]
    assert "Table 1" in text and "Table 3" in text and "Shapley" in text
    assert "| subset | size | accuracy WA (%) | UA (%) | macro F1 (%)" in text
    assert "η = refit test risk - that of TA" in text
    assert "| subset | refit test risk | refit test accuracy (%) | η |" in text
    assert "![tiny: macro F1 (%)](tiny_f1_macro_vs_fraction.png)" in text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_results_for_regression(tmp_path: Path) -> None:
    data = prepare(tiny_regression(), "reg")
    cfg = SweepConfig(hidden=4, epochs=2, seeds=[0, 1], fractions=[0.5, 1.0], probe=False)
    rec = run_sweep(data, cfg, progress=False)
    text = write_results(tmp_path, real=[RealResult(data, cfg, rec)]).read_text()
    assert "| subset | size | MSE | MAE | Pearson r |" in text
    t1 = (tmp_path / "reg_table1.tex").read_text()
    check_structure(t1, 5)
    assert "Higher is better: Pearson r. Lower is better: MSE; MAE." in t1
    t3 = (tmp_path / "reg_table3.tex").read_text()
    assert len(check_structure(t3, 4)) == 2 and r"$\Delta$ test loss" in t3
    check_structure((tmp_path / "reg_eta.tex").read_text(), 3)  # no accuracy column
    assert not (tmp_path / "reg_f1_macro_vs_fraction.png").exists()
    assert (tmp_path / "reg_accuracy_vs_fraction.svg").stat().st_size > 0
