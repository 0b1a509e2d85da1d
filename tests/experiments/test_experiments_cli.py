"""`mmkernels sweep` on a small .npz dataset it writes, and the reproduce parser."""

from __future__ import annotations

import csv
from pathlib import Path

from test_experiments_tables import tiny_dataset

from mmkernels.experiments.cli import main


def test_sweep_cli_on_npz(tmp_path: Path, capsys) -> None:
    path = tmp_path / "mine.npz"
    tiny_dataset(n=60).save(path)
    out = tmp_path / "res"
    rc = main(["sweep", "--data", str(path), "--out", str(out), "--seeds", "1",
               "--epochs", "2", "--hidden", "8", "--fractions", "0.1", "1",
               "--no-progress", "--fusion", "early"])
    assert rc == 0
    text = (out / "report.md").read_text()
    assert "mine" in text and "early fusion" in text
    with open(out / "mine_subsets_per_seed.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 and {r["subset"] for r in rows} == {"T", "A", "TA"}
    assert "report:" in capsys.readouterr().out
    assert not (out / "mine_probe_per_seed.csv").exists()  # no probe for early fusion


def test_sweep_cli_without_split(tmp_path: Path) -> None:
    ds = tiny_dataset(n=60)
    ds.split = None
    path = tmp_path / "nosplit.npz"
    ds.save(path)
    out = tmp_path / "r2"
    assert main(["sweep", "--data", str(path), "--out", str(out), "--seeds", "1",
                 "--epochs", "1", "--hidden", "4", "--fractions", "1", "--no-progress"]) == 0
    assert (out / "nosplit_table3.csv").exists()


def test_reproduce_with_iemocap_file(tmp_path: Path) -> None:
    import numpy as np
    from test_data_iemocap import conversation_tuple, dump

    rng = np.random.default_rng(0)
    sizes = {f"c{i}": 12 for i in range(6)}
    path = dump(tmp_path / "IEMOCAP_features.pkl",
                conversation_tuple(rng, sizes, test_ids=("c4", "c5")))
    out = tmp_path / "rep"
    rc = main(["reproduce", "--out", str(out), "--bundled", "--iemocap", str(path),
               "--table4-seeds", "1", "--n-train", "300", "--n-test", "100", "--seeds", "1",
               "--epochs", "1", "--hidden", "4", "--fractions", "0.5", "1", "--no-progress"])
    assert rc == 0
    text = (out / "report.md").read_text()
    assert "## iemocap" in text and "Table 4" in text
    with open(out / "iemocap_table1.csv") as f:
        assert {r["subset"] for r in csv.DictReader(f)} == {"T", "A", "V", "TA", "TV", "AV",
                                                            "TAV"}


def test_sweep_cli_regression(tmp_path: Path) -> None:
    from mmkernels.experiments.data import make_overlap_regression

    path = tmp_path / "reg.npz"
    make_overlap_regression(0.5, dim=3, n_train=60, n_test=30).save(path)
    out = tmp_path / "r3"
    assert main(["sweep", "--data", str(path), "--out", str(out), "--seeds", "1",
                 "--epochs", "2", "--hidden", "4", "--fractions", "0.5", "1",
                 "--no-progress"]) == 0
    text = (out / "report.md").read_text()
    assert "test loss" in text and "not checked" in text
    assert (out / "reg_table3.csv").exists() and (out / "reg_shapley.csv").exists()
