"""Results folder: atomic writes and the report's contents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_experiments_tables import tiny_dataset

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
    for name in ("config.json", "claims.json", "table4.csv", "table4_mse.png",
                 "tiny_table1.csv", "tiny_table2.csv", "tiny_table3.csv", "tiny_shapley.csv",
                 "tiny_laziness.csv", "tiny_subsets_per_seed.csv", "tiny_per_seed.json",
                 "tiny_accuracy_vs_fraction.png", "tiny_unimodal.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "table4_mse.png").read_bytes()[:4] == b"\x89PNG"
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert "torch" in cfg_json["versions"] and cfg_json["cmd"] == "test"
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert any("gamma" in c["claim"] for c in claims)
    assert all(c["holds"] in (True, False) for c in claims)
    for c in claims:
        assert ("**holds**" in text) or ("**does not hold**" in text)
        assert c["detail"]
    assert "Table 1" in text and "Table 3" in text and "Shapley" in text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
