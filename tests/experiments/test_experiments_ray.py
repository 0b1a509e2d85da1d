"""Sweeps on Ray: a local Ray started here (2 CPUs) gives exactly the in-process records."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch
from test_experiments_tables import tiny_dataset

from mmkernels.experiments.cli import main
from mmkernels.experiments.executors import RayExecutor
from mmkernels.experiments.store import read_records
from mmkernels.experiments.sweep import SweepConfig, prepare, run_sweep

# Ray is the optional extra mmkernels[ray]: without it these tests skip, except in CI, whose
# set-up (scripts/setup_env.sh) installs it, so there a missing Ray fails.
ray = importlib.import_module("ray") if os.environ.get("CI") else pytest.importorskip("ray")


def _cells(folder: Path) -> dict[str, dict]:
    return {r["key"]: r["records"] for r in read_records(folder)}


def test_ray_sweep_equals_in_process(tmp_path: Path) -> None:
    data = tmp_path / "mine.npz"
    tiny_dataset(n=120).save(data)
    opts = ["--data", str(data), "--seeds", "3", "--epochs", "5", "--hidden", "8",
            "--fractions", "0.5", "1", "--no-progress"]
    assert main(["sweep", *opts, "--out", str(tmp_path / "local"), "--threads", "1"]) == 0
    assert main(["sweep", *opts, "--out", str(tmp_path / "ray"), "--executor", "ray",
                 "--workers", "2", "--cpus-per-cell", "1"]) == 0
    assert not ray.is_initialized()  # the executor stops the Ray it started
    local, remote = _cells(tmp_path / "local"), _cells(tmp_path / "ray")
    assert len(local) == 6 and remote == local
    assert (tmp_path / "ray" / "mine_table1.csv").read_text() == \
        (tmp_path / "local" / "mine_table1.csv").read_text()


def test_ray_executor_api_ships_data_once(tmp_path: Path) -> None:
    ds = prepare(tiny_dataset(n=45), "tiny")
    cfg = SweepConfig(hidden=4, epochs=2, seeds=[0, 1], fractions=[1.0], probe=False)
    torch.set_num_threads(1)
    local = run_sweep(ds, cfg, progress=False)
    with RayExecutor(num_cpus=2) as ex:
        remote = run_sweep(ds, cfg, progress=False, executor=ex, store=tmp_path)
        assert len(ex._puts) == 2  # the dataset and the config, each put once
    assert remote == local
    with pytest.raises(ValueError, match="cpus_per_cell must be >= 1"):
        RayExecutor(cpus_per_cell=0)
