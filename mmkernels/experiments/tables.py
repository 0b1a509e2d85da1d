"""Aggregated tables (mean ± std over seeds) from a sweep's long-format records.

Every function takes the per-seed records (lists of flat dicts, as produced by
:mod:`.sweep` and :mod:`.table4`) and returns aggregated rows (flat dicts with
``<value>_mean``, ``<value>_std`` and ``n_seeds``); :func:`markdown` renders rows, and
:func:`pivot_markdown` a subset-by-column grid of "mean ± std" cells (:mod:`.latex` renders
the same as booktabs LaTeX).

std is the sample standard deviation (ddof = 1; 0 with a single seed).

The end-to-end test metrics (computed once, by :mod:`mmkernels.metrics`, in the sweep) and how
the tables show them are :data:`CLASSIFICATION_METRICS` and :data:`REGRESSION_METRICS`: each
names its record field, its header, its scale (fractions as %) and which way is better.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmkernels.markdown import markdown_table

from .shapley import empty_set_values, shapley_values

__all__ = ["Metric", "CLASSIFICATION_METRICS", "REGRESSION_METRICS", "TABLE3_VALUES",
           "ETA_VALUES", "metrics_of", "metrics_for", "aggregate", "table1", "table2",
           "table3", "eta_table",
           "unimodal", "shapley_table", "laziness", "table4", "markdown", "pivot_markdown",
           "fmt_pm"]

Row = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    """How a table shows one recorded value: its record field (``key``; aggregated rows carry
    ``key_mean`` / ``key_std``), header ``label``, the factor applied before averaging
    (``scale``: 100 for fractions shown in %), whether higher values are better, and the
    decimals shown."""

    key: str
    label: str
    scale: float = 1.0
    higher_is_better: bool = True
    digits: int = 2


#: Classification: accuracy is the IEMOCAP literature's weighted accuracy (WA), UA the mean
#: per-class recall; definitions in mmkernels.metrics.
CLASSIFICATION_METRICS = (
    Metric("test_acc", "accuracy WA (%)", 100.0, True),
    Metric("test_ua", "UA (%)", 100.0, True),
    Metric("test_f1_macro", "macro F1 (%)", 100.0, True),
    Metric("test_f1_weighted", "weighted F1 (%)", 100.0, True),
    Metric("test_loss", "cross-entropy (nats)", 1.0, False, 3),
)
REGRESSION_METRICS = (
    Metric("test_loss", "MSE", 1.0, False, 3),
    Metric("test_mae", "MAE", 1.0, False, 3),
    Metric("test_pearson", "Pearson r", 1.0, True, 3),
)
#: Table 3 (nested pairs M ⊃ N; Δ and γ are M's value - N's): "better" is the direction in
#: which M is better than N.
TABLE3_VALUES = (
    Metric("test_acc_diff_points", "Δ test accuracy (points)", 1.0, True, 3),
    Metric("test_loss_diff", "Δ test loss", 1.0, False, 3),
    Metric("gamma_loss", "γ (loss units)", 1.0, False, 3),
    Metric("gamma_acc_points", "γ (accuracy points)", 1.0, True, 3),
)
#: The refitted heads per subset (eta's table).
ETA_VALUES = (
    Metric("refit_test_risk", "refit test risk", 1.0, False, 3),
    Metric("refit_test_acc", "refit test accuracy (%)", 100.0, True),
    Metric("eta", "η", 1.0, False, 3),
)


def metrics_of(rows: Sequence[Row]) -> tuple[Metric, ...]:
    """The metrics of records, the primary one first (classification when they hold an
    accuracy, else regression)."""
    return CLASSIFICATION_METRICS if rows and rows[0].get("test_acc") is not None \
        else REGRESSION_METRICS


def metrics_for(task: str) -> tuple[Metric, ...]:
    """The task's metrics, the primary one first."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    return CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS


def _scales(ms: Sequence[Metric]) -> dict[str, float]:
    return {m.key: m.scale for m in ms}


def _std(v: Sequence[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def aggregate(rows: Sequence[Row], keys: Sequence[str], values: Sequence[str],
              scale: float | dict[str, float] = 1.0) -> list[Row]:
    """Group rows by ``keys`` (first-seen order) and take mean/std of each value (skipping
    None), multiplied by ``scale`` (one factor, or one per value name, default 1)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, grp in groups.items():
        row: Row = dict(zip(keys, key, strict=True))
        row["n_seeds"] = len(grp)
        for v in values:
            f = scale.get(v, 1.0) if isinstance(scale, dict) else scale
            vals = [f * float(r[v]) for r in grp if r.get(v) is not None]
            row[f"{v}_mean"] = float(np.mean(vals)) if vals else None
            row[f"{v}_std"] = _std(vals) if vals else None
        out.append(row)
    return out


def table1(rows: Sequence[Row], fraction: float = 1.0) -> list[Row]:
    """Table 1: every subset's test metrics (:func:`metrics_of`, fractions in %) at
    ``fraction`` (default the full set)."""
    sel = [r for r in rows if abs(r["fraction"] - fraction) < 1e-12]
    ms = metrics_of(sel)
    return aggregate(sel, ["dataset", "subset", "size"], [m.key for m in ms], _scales(ms))


def table2(rows: Sequence[Row]) -> list[Row]:
    """Table 2: the test metrics (accuracy first, in %) per subset and training fraction,
    with the mean number of training rows."""
    ms = metrics_of(rows)
    return aggregate(rows, ["dataset", "subset", "size", "fraction"],
                     [m.key for m in ms] + ["n_train"], _scales(ms))


def table3(pairs: Sequence[Row]) -> list[Row]:
    """Table 3: for every nested pair M ⊃ N, the end-to-end test-accuracy difference
    (points, positive = M better) and test-loss difference (negative = M better), gamma in
    loss units (refit test risk(M) - risk(N), NEGATIVE = M better) and gamma in accuracy
    points (positive = M better)."""
    return aggregate(pairs, ["dataset", "fraction", "M", "N", "size_M", "size_N"],
                     [m.key for m in TABLE3_VALUES])


def eta_table(refit: Sequence[Row], full: str) -> list[Row]:
    """eta per subset from the refit records: the refitted head's test risk and accuracy (%)
    and eta = refit test risk(s) - refit test risk(``full``) in the same (fraction, seed), the
    reference of :func:`mmkernels.eta.refit_quality` without a Bayes risk (an estimate:
    eta < 0 means s's refit beat the all-modality subset's)."""
    ref = {(r["dataset"], r["fraction"], r["seed"]): r["refit_test_risk"]
           for r in refit if r["subset"] == full}
    rows = []
    for r in refit:
        base = ref.get((r["dataset"], r["fraction"], r["seed"]))
        eta = None if base is None or r["refit_test_risk"] is None \
            else r["refit_test_risk"] - base
        rows.append({**r, "eta": eta})
    return aggregate(rows, ["dataset", "fraction", "subset", "size"],
                     [m.key for m in ETA_VALUES], _scales(ETA_VALUES))


def unimodal(rows: Sequence[Row]) -> list[Row]:
    """Uni-modal baselines: the size-1 subsets' test metrics, per fraction."""
    ms = metrics_of(rows)
    return aggregate([r for r in rows if r["size"] == 1],
                     ["dataset", "subset", "fraction"], [m.key for m in ms], _scales(ms))


def shapley_table(rows: Sequence[Row], modality_names: Sequence[str],
                  subset_of: Callable[[str], tuple[int, ...]],
                  train_y: np.ndarray, test_y: np.ndarray, task: str,
                  num_classes: int | None = None) -> tuple[list[Row], dict[str, float]]:
    """Exact Shapley value of each modality per (fraction, seed) from the full sweep, for the
    test accuracy (points, classification) and the test risk (the end-to-end test loss), then
    mean ± std over seeds. Empty-set values: :func:`.shapley.empty_set_values`.

    Returns (aggregated rows, the empty-set values used)."""
    empty = empty_set_values(train_y, test_y, task, num_classes)
    k_all = len(modality_names)
    per_seed: list[Row] = []
    cells: dict[tuple, list[Row]] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["fraction"], r["seed"]), []).append(r)
    for (ds, frac, seed), grp in cells.items():
        risk = {subset_of(r["subset"]): r["test_loss"] for r in grp}
        phi_r = shapley_values(risk, k_all, empty["risk"])
        phi_a = None
        if task == "classification":
            acc = {subset_of(r["subset"]): 100.0 * r["test_acc"] for r in grp}
            phi_a = shapley_values(acc, k_all, 100.0 * empty["acc"])
        for k, name in enumerate(modality_names):
            per_seed.append({"dataset": ds, "fraction": frac, "seed": seed, "modality": name,
                             "shapley_acc_points": None if phi_a is None else phi_a[k],
                             "shapley_risk": phi_r[k]})
    agg = aggregate(per_seed, ["dataset", "fraction", "modality"],
                    ["shapley_acc_points", "shapley_risk"])
    return agg, empty


def laziness(probe: Sequence[Row]) -> list[Row]:
    """The modality-laziness probe, mean ± std over seeds (see sweep.laziness_probe)."""
    return aggregate(probe, ["dataset", "fraction", "modality"],
                     ["joint_acc_pct", "alone_acc_pct", "acc_gap_points", "joint_risk",
                      "alone_risk", "risk_gap"])


def table4(rows: Sequence[Row]) -> list[Row]:
    """Table 4: test MSE per (subset, w), with the Bayes risk and the paper's cell."""
    out = aggregate(rows, ["subset", "size", "w"], ["test_mse", "bayes_risk"])
    paper = {(r["subset"], r["w"]): r.get("paper_mse") for r in rows}
    for r in out:
        r["paper_mse"] = paper.get((r["subset"], r["w"]))
    return out


def fmt_pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    """"mean ± std" with ``digits`` decimals; "-" for a missing value."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {(std or 0.0):.{digits}f}"


def _cell(v: Any, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def markdown(rows: Sequence[Row], columns: Sequence[str], *,
             digits: int | Mapping[str, int] = 2, pm: Sequence[str] = (),
             headers: Sequence[str] | None = None) -> str:
    """A Markdown table of ``columns`` (headed by ``headers``, default the column names); a
    name in ``pm`` renders its _mean/_std as "mean ± std". ``digits``: decimals, one number
    or one per column (default 2)."""
    if headers is not None and len(headers) != len(columns):
        raise ValueError(f"headers: expected {len(columns)} (one per column), got "
                         f"{len(headers)}")

    def d(c: str) -> int:
        return digits.get(c, 2) if isinstance(digits, Mapping) else digits

    return markdown_table(list(headers or columns), [
        [fmt_pm(r.get(f"{c}_mean"), r.get(f"{c}_std"), d(c)) if c in pm
         else _cell(r.get(c), d(c)) for c in columns] for r in rows])


def pivot_markdown(rows: Sequence[Row], row_key: str, col_key: str, value: str, *,
                   digits: int = 2, col_fmt: Callable[[Any], str] = str) -> str:
    """Grid: one line per ``row_key`` value, one column per ``col_key`` value, cells
    "mean ± std" of ``value``."""
    rk = list(dict.fromkeys(r[row_key] for r in rows))
    ck = list(dict.fromkeys(r[col_key] for r in rows))
    grid = {(r[row_key], r[col_key]): r for r in rows}
    cells = [[str(a)] + ["-" if (r := grid.get((a, c))) is None
                         else fmt_pm(r.get(f"{value}_mean"), r.get(f"{value}_std"), digits)
                         for c in ck] for a in rk]
    return markdown_table([row_key] + [col_fmt(c) for c in ck], cells)
