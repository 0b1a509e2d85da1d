"""The sweep cell's data flow: standardisation by default in `mmkernels sweep`, the dataset's
presence mask in training and refits, and how the refitted heads' l2 is chosen."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmkernels.experiments.cli import main
from mmkernels.experiments.data import MultiModalDataset
from mmkernels.experiments.sweep import SweepConfig, prepare, run_cell


def _views(n: int = 300, classes: int = 4, offset: float = 0.0, seed: int = 0,
           presence: np.ndarray | None = None) -> MultiModalDataset:
    """Two informative views; "big" carries ``offset`` (values in the hundreds when 300)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    mods = {}
    for name, d in (("small", 5), ("big", 12)):
        centres = 2.0 * rng.normal(size=(classes, d))
        mods[name] = (centres[y] + rng.normal(size=(n, d))).astype(np.float32)
    mods["big"] = mods["big"] + offset
    split = np.where(np.arange(n) % 10 < 7, "train", "test")
    return MultiModalDataset(mods, y, task="classification", split=split, presence=presence)


CFG = SweepConfig(hidden=16, epochs=40, batch_size=256, seeds=[0], fractions=[1.0],
                  refit_fractions=[1.0], head_l2=1.0, probe=False)


def _acc(rec: dict, subset: str) -> float:
    return next(r["test_acc"] for r in rec["subsets"] if r["subset"] == subset)


def test_a_view_in_the_hundreds_trains_to_chance_unless_standardized():
    """Root cause: the view's large positive mean makes every Adam step move all of a unit's
    weights the same way, shifting its pre-activation by ~ lr * d * mean; within a few steps
    every ReLU unit of the view's encoder is dead on every row, and the subset outputs a
    constant. Standardising with the training rows' statistics (the sweep's default) fixes it."""
    ds = _views(offset=300.0)
    raw = run_cell(prepare(ds, "raw"), 0, 1.0, CFG)
    std = run_cell(prepare(ds, "std", standardize=True), 0, 1.0, CFG)
    assert _acc(raw, "B") <= 0.30                            # 4 classes: chance 0.25
    assert _acc(std, "B") >= 0.9 and _acc(std, "SB") >= 0.9


def test_standardize_uses_the_present_training_rows_only():
    ds = _views(offset=300.0)
    data = prepare(ds, "std", standardize=True)
    assert data.standardized and not prepare(ds, "raw").standardized
    for x in data.train_xs:
        np.testing.assert_allclose(x.double().mean(0).numpy(), 0.0, atol=1e-5)
        np.testing.assert_allclose(x.double().std(0, correction=0).numpy(), 1.0, atol=1e-5)
    assert abs(float(data.test_xs[1].mean())) < 0.3        # test rows: the train statistics
    presence = np.ones((300, 2), dtype=bool)
    presence[::3, 1] = False
    masked = _views(offset=300.0, presence=presence)
    big = masked.modalities["big"]
    big[~presence[:, 1]] = 1e6                                # what absent rows hold is moot
    data = prepare(masked, "m", standardize=True)
    tr, m = data.train_xs[1].double(), data.train_mask[:, 1]
    np.testing.assert_allclose(tr[m].mean(0).numpy(), 0.0, atol=1e-5)
    assert float(tr[~m].abs().max()) == 0.0 and float(data.test_xs[1][~data.test_mask[:, 1]]
                                                       .abs().max()) == 0.0


def test_the_presence_mask_reaches_training_and_refits():
    """What an absent modality's rows hold never reaches a result: garbage there gives the
    records of zeros there, for training, evaluation, the refits and the probe (so the mask
    is used, not ignored as it was); without the mask the same zeros give other records."""
    rng = np.random.default_rng(1)
    presence = rng.random((300, 2)) < 0.75
    presence[:, 0] |= ~presence[:, 1]                          # every row has a modality
    zeroed = _views(presence=presence)
    for k, name in enumerate(zeroed.names):
        zeroed.modalities[name][~presence[:, k]] = 0.0
    garbage = _views(presence=presence)
    for k, name in enumerate(garbage.names):
        garbage.modalities[name][~presence[:, k]] = 1e5
    cfg = SweepConfig(hidden=8, epochs=5, batch_size=128, seeds=[0], fractions=[1.0],
                      refit_fractions=[1.0], probe=True, head_cv_folds=3)
    a = run_cell(prepare(zeroed, "d", standardize=True), 0, 1.0, cfg)
    b = run_cell(prepare(garbage, "d", standardize=True), 0, 1.0, cfg)
    assert a == b
    assert {r["refit_l2"] for r in a["refit"]} and all(r["refit_cv_risk"] is not None
                                                       for r in a["refit"])
    assert len(a["probe"]) == 2
    unmasked = zeroed.subset(np.arange(300))
    unmasked.presence = None
    c = run_cell(prepare(unmasked, "d", standardize=True), 0, 1.0, cfg)
    assert c["subsets"] != a["subsets"]


def test_fixed_and_cross_validated_head_l2_in_the_records():
    data = prepare(_views(n=120), "t", standardize=True)
    fixed = run_cell(data, 0, 1.0, SweepConfig(hidden=8, epochs=3, head_l2=2.0, probe=False))
    assert {r["refit_l2"] for r in fixed["refit"]} == {2.0}
    assert {r["refit_cv_risk"] for r in fixed["refit"]} == {None}
    assert SweepConfig(head_l2=2.0).head_l2_text() == "l2 fixed at 2 for every subset"
    assert "5-fold cross-validation on the training rows" in SweepConfig().head_l2_text()


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-standardize"], False)])
def test_mmkernels_sweep_standardizes_by_default_and_records_it(tmp_path, flag, expected):
    path = tmp_path / "views.npz"
    _views(n=80, offset=300.0).save(path)
    out = tmp_path / "out"
    assert main(["sweep", "--data", str(path), "--out", str(out), "--seeds", "1", "--epochs",
                 "2", "--hidden", "4", "--fractions", "1.0", "--no-probe", "--no-progress",
                 "--head-l2", "1.0", *flag]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["standardize"] is expected
    assert json.loads((out / "sweep.json").read_text())["options"]["no_standardize"] is not \
        expected
    assert "Refitted heads: l2 fixed at 1 for every subset." in (out / "report.md").read_text()
