"""Aggregated tables (mean ± std over seeds) from a sweep's long-format records.

Every function takes the per-seed records (lists of flat dicts, as produced by
:mod:`.sweep` and :mod:`.table4`) and returns aggregated rows (flat dicts with
``<value>_mean``, ``<value>_std`` and ``n_seeds``); :func:`markdown` renders rows, and
:func:`pivot_markdown` a subset-by-column grid of "mean ± std" cells.

std is the sample standard deviation (ddof = 1; 0 with a single seed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmkernels.markdown import markdown_table

from .shapley import empty_set_values, shapley_values

__all__ = ["aggregate", "table1", "table2", "table3", "unimodal", "shapley_table",
           "laziness", "table4", "markdown", "pivot_markdown", "fmt_pm"]

Row = dict[str, Any]


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


def _metric(rows: Sequence[Row]) -> tuple[str, float, str]:
    """("test_acc", 100, "accuracy (%)") for classification records, else the test loss."""
    if rows and rows[0].get("test_acc") is not None:
        return "test_acc", 100.0, "test accuracy (%)"
    return "test_loss", 1.0, "test loss (MSE)"


def table1(rows: Sequence[Row], fraction: float = 1.0) -> list[Row]:
    """Table 1: every subset's test accuracy (%) at ``fraction`` (default the full set)."""
    sel = [r for r in rows if abs(r["fraction"] - fraction) < 1e-12]
    metric, scale, _ = _metric(sel)
    return aggregate(sel, ["dataset", "subset", "size"], [metric], scale)


def table2(rows: Sequence[Row]) -> list[Row]:
    """Table 2: test accuracy (%) per subset and training fraction."""
    metric, scale, _ = _metric(rows)
    return aggregate(rows, ["dataset", "subset", "size", "fraction"], [metric, "n_train"],
                     {metric: scale})


def table3(pairs: Sequence[Row]) -> list[Row]:
    """Table 3: for every nested pair M ⊃ N, the end-to-end test-accuracy difference
    (points, positive = M better), gamma in loss units (refit test risk(M) - risk(N),
    NEGATIVE = M better) and gamma in accuracy points (positive = M better)."""
    return aggregate(pairs, ["dataset", "fraction", "M", "N", "size_M", "size_N"],
                     ["test_acc_diff_points", "gamma_loss", "gamma_acc_points"])


def unimodal(rows: Sequence[Row]) -> list[Row]:
    """Uni-modal baselines: the size-1 subsets, per fraction."""
    metric, scale, _ = _metric(rows)
    return aggregate([r for r in rows if r["size"] == 1],
                     ["dataset", "subset", "fraction"], [metric], scale)


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


def markdown(rows: Sequence[Row], columns: Sequence[str], *, digits: int = 2,
             pm: Sequence[str] = ()) -> str:
    """A Markdown table of ``columns``; a name in ``pm`` renders its _mean/_std as
    "mean ± std"."""
    return markdown_table(columns, [
        [fmt_pm(r.get(f"{c}_mean"), r.get(f"{c}_std"), digits) if c in pm
         else _cell(r.get(c), digits) for c in columns] for r in rows])


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
