"""The results folder: per-seed and aggregated tables, figures, claims and report.md.

Layout of ``out_dir`` (every file written atomically, see :mod:`.io`):

    config.json                       exact configuration, versions, command, runtime
    records.jsonl                     the results store: one record per finished sweep cell
                                      (written by run_sweep, see store.py)
    report.md                         the tables, the checks and the claims, in Markdown
    claims.json                       each checked claim: holds / does not hold + numbers
    table4_per_seed.csv / .json       synthetic: one row per (w, seed, subset)
    table4.csv, table4.md, table4_check.csv, table4_mse.png
    <ds>_per_seed.json                every per-seed record of dataset <ds>
    <ds>_subsets_per_seed.csv         one row per (seed, fraction, subset)
    <ds>_pairs_per_seed.csv, <ds>_refit_per_seed.csv, <ds>_probe_per_seed.csv
    <ds>_table1.csv  _table2.csv  _table3.csv  _unimodal.csv  _shapley.csv  _laziness.csv
    <ds>_accuracy_vs_fraction.png
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import figures, tables
from .io import write_csv, write_json, write_text_atomic
from .provenance import versions
from .sampling import SAMPLING_RULE
from .sweep import Prepared, SweepConfig
from .table4 import check_table4

__all__ = ["RealResult", "claims", "versions", "write_results"]


@dataclass
class RealResult:
    """One dataset's sweep: the prepared data, its configuration and its records."""

    data: Prepared
    cfg: SweepConfig
    records: dict[str, list]


def _mean(rows: Sequence[dict], key: str) -> float:
    return float(sum(r[key] for r in rows) / len(rows))


def claims(res: RealResult) -> list[dict[str, Any]]:
    """Check the paper's qualitative claims on one classification sweep, with numbers.

    1. "With enough data more modalities are better": at the largest fraction, the
       all-modality subset has the highest mean test accuracy of all subsets.
    2. "From 1e-1 on, all modalities win": at every fraction >= 0.1, the all-modality
       subset has the highest mean test accuracy.
    3. "Fewer modalities can win at tiny fractions": at some fraction <= 1e-2, some proper
       subset has a higher mean test accuracy than the all-modality subset.
    4. "gamma is negative in loss units for M ⊃ N": every nested pair at the refit fraction
       has a negative mean gamma_loss (refit test risk(M) - refit test risk(N)).
    Each record: claim, holds (True/False, None = not checkable), detail.
    """
    data, recs = res.data, res.records
    out: list[dict[str, Any]] = []
    if data.task != "classification":
        return [{"claim": "accuracy claims", "holds": None,
                 "detail": "regression data: the accuracy claims are not checked"}]
    full = data.subset_names[-1]
    agg = tables.table2(recs["subsets"])
    by = {(r["subset"], r["fraction"]): r["test_acc_mean"] for r in agg}
    fracs = sorted({r["fraction"] for r in agg})

    def best_at(f: float) -> tuple[str, float]:
        cand = [(s, by[(s, f)]) for s in data.subset_names if (s, f) in by]
        return max(cand, key=lambda t: t[1])

    top = fracs[-1]
    b, bv = best_at(top)
    out.append({"claim": f"more modalities are better with enough data (fraction {top:g}: "
                         f"{full} has the best mean test accuracy)",
                "holds": b == full,
                "detail": f"{full}: {by[(full, top)]:.2f}%; best subset {b}: {bv:.2f}%"})
    big = [f for f in fracs if f >= 0.1 - 1e-12]
    if big:
        fails = [(f, *best_at(f)) for f in big if best_at(f)[0] != full]
        detail = "; ".join(f"fraction {f:g}: {full} {by[(full, f)]:.2f}% vs best {s} "
                           f"{v:.2f}%" for f, s, v in fails) or \
            ", ".join(f"{f:g}: {by[(full, f)]:.2f}%" for f in big) + f" ({full} best)"
        out.append({"claim": f"from fraction 0.1 on, all modalities ({full}) win",
                    "holds": not fails, "detail": detail})
    small = [f for f in fracs if f <= 1e-2 + 1e-12]
    if small:
        wins = []
        for f in small:
            s, v = best_at(f)
            if s != full and v > by[(full, f)]:
                wins.append(f"fraction {f:g}: {s} {v:.2f}% > {full} {by[(full, f)]:.2f}%")
        out.append({"claim": "fewer modalities can win at tiny fractions (<= 1e-2)",
                    "holds": bool(wins),
                    "detail": "; ".join(wins) if wins else
                    "; ".join(f"fraction {f:g}: {full} {by[(full, f)]:.2f}% is best"
                              for f in small)})
    t3 = tables.table3(recs["pairs"])
    if t3:
        neg = [r for r in t3 if r["gamma_loss_mean"] < 0]
        worst = max(t3, key=lambda r: r["gamma_loss_mean"])
        out.append({"claim": "gamma < 0 in loss units for every nested pair M ⊃ N "
                             "(M's representation better)",
                    "holds": len(neg) == len(t3),
                    "detail": f"{len(neg)}/{len(t3)} pairs negative; largest gamma_loss "
                              f"{worst['gamma_loss_mean']:.4f} ({worst['M']} vs {worst['N']})"})
    return out


def _parse(data: Prepared):
    index = dict(zip(data.subset_names, data.subsets, strict=True))
    return lambda name: index[name]


def _frac(f: float) -> str:
    return f"{f:g}"


def write_results(
    out_dir: str | Path, *, table4_rows: Sequence[dict] | None = None,
    real: Sequence[RealResult] = (), config: dict[str, Any] | None = None,
    runtime_s: float | None = None, title: str = "mmkernels results",
) -> Path:
    """Write the results folder (see the module docstring); returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(config or {})
    cfg["versions"] = versions()
    cfg["runtime_s"] = runtime_s
    cfg["sampling_rule"] = SAMPLING_RULE
    write_json(out / "config.json", cfg)
    md = [f"# {title}", ""]
    if runtime_s is not None:
        md += [f"Runtime: {runtime_s:.1f} s. Configuration and versions: `config.json`.", ""]
    all_claims: list[dict[str, Any]] = []

    if table4_rows:
        t4 = tables.table4(table4_rows)
        check = check_table4(table4_rows)
        write_csv(out / "table4_per_seed.csv", table4_rows)
        write_json(out / "table4_per_seed.json", list(table4_rows))
        write_csv(out / "table4.csv", t4)
        write_csv(out / "table4_check.csv", check)
        paper_sub = {"{1}", "{1,2}", "{1,2,3}", "{1,2,3,4}"}
        grid = tables.pivot_markdown([r for r in t4 if r["subset"] in paper_sub], "subset",
                                     "w", "test_mse", col_fmt=lambda w: f"w = {w}")
        write_text_atomic(out / "table4.md", grid)
        figures.mse_vs_modalities(t4, out / "table4_mse.png")
        n_ok = sum(c["ok"] for c in check)
        seeds = len({r["seed"] for r in table4_rows})
        holds = n_ok == len(check)
        all_claims.append({"dataset": "synthetic", "claim": "Table 4 reproduced (non-zero "
                           "cells within 10% of the paper, zero cells < 1% of 301.92)",
                           "holds": holds, "detail": f"{n_ok}/{len(check)} cells pass"})
        md += ["## Table 4: latent representation quality on synthetic data (test MSE)", "",
               f"Generator: x1 ~ N(0, I_100), x_k = w x1 + (1 - w) u_k, y = sum of all 400 "
               f"features; {table4_rows[0]['n_train']} train / {table4_rows[0]['n_test']} "
               f"test; {seeds} seeds (mean ± std). Encoder: the identity on the subset's raw "
               "features (= a full-rank linear encoder); head: ridge refit with l2 = 1e-6 "
               "trace(Gram)/H. All 15 subsets are in `table4.csv`.", "", grid,
               "Acceptance check against the paper (mean over seeds):", "",
               tables.markdown(check, ["subset", "w", "paper", "ours_mean", "ours_std",
                                       "rel_err", "rule", "ok"], digits=3),
               f"**Table 4: {'holds' if holds else 'does not hold'}** ({n_ok}/{len(check)} "
               "cells pass).", "", "![Table 4](table4_mse.png)", ""]

    for res in real:
        d, recs, name = res.data, res.records, res.data.name
        write_json(out / f"{name}_per_seed.json", {"config": res.cfg.to_dict(), **recs})
        for key in ("subsets", "pairs", "refit", "probe"):
            if recs[key]:
                write_csv(out / f"{name}_{key}_per_seed.csv", recs[key])
        t1 = tables.table1(recs["subsets"], max(res.cfg.fractions))
        t2 = tables.table2(recs["subsets"])
        t3 = tables.table3(recs["pairs"])
        uni = tables.unimodal(recs["subsets"])
        lazy = tables.laziness(recs["probe"])
        shap, empty = tables.shapley_table(
            recs["subsets"], d.modality_names, _parse(d), d.train_y.numpy(), d.test_y.numpy(),
            d.task, d.num_outputs if d.task == "classification" else None)
        for fname, rows in (("table1", t1), ("table2", t2), ("table3", t3),
                            ("unimodal", uni), ("shapley", shap), ("laziness", lazy)):
            if rows:
                write_csv(out / f"{name}_{fname}.csv", rows)
        metric = "test_acc" if d.task == "classification" else "test_loss"
        unit = "test accuracy (%)" if d.task == "classification" else "test loss"
        figures.accuracy_vs_fraction(t2, out / f"{name}_accuracy_vs_fraction.png",
                                     title=f"{name}: {unit} against the training fraction")
        c = res.cfg
        md += [f"## {name}: {d.num_modalities} modalities "
               f"({', '.join(d.modality_names)}), {d.train_y.shape[0]} train / "
               f"{d.test_y.shape[0]} test", "",
               f"Model: {c.fusion} fusion, hidden {c.hidden}, Adam lr {c.lr}, batch "
               f"{c.batch_size}, {c.epochs} epochs, weight decay {c.weight_decay}, seeds "
               f"{c.seeds}. Training fractions: {SAMPLING_RULE}.", "",
               f"### Table 1: {unit} of every subset (fraction {max(c.fractions):g})", "",
               tables.markdown(t1, ["subset", "size", metric], pm=[metric]),
               f"### Table 2: {unit} against the training fraction", "",
               tables.pivot_markdown(t2, "subset", "fraction", metric, col_fmt=_frac),
               "n_train per fraction: " + ", ".join(
                   f"{_frac(r['fraction'])}: {r['n_train_mean']:.0f}" for r in t2
                   if r["subset"] == d.subset_names[0]), "",
               f"![{name} Table 2]({name}_accuracy_vs_fraction.png)", ""]
        if t3:
            md += ["### Table 3: latent quality of nested pairs M ⊃ N (frozen encoders, "
                   "refitted heads)", "",
                   "test_acc_diff_points: end-to-end test accuracy(M) - (N), points, "
                   "positive = M better. gamma_loss: refit test risk(M) - risk(N) in nats "
                   "(the definition's sign: NEGATIVE = M better). gamma_acc_points: refit "
                   "test accuracy(M) - (N), points (the paper's Table 3 sign: positive = M "
                   "better).", "", f"Refitted heads: {c.head_l2_text()}.", "",
                   tables.markdown(t3, ["M", "N", "test_acc_diff_points", "gamma_loss",
                                        "gamma_acc_points"],
                                   pm=["test_acc_diff_points", "gamma_loss",
                                       "gamma_acc_points"], digits=3)]
        md += ["### Uni-modal baselines (the size-1 subsets)", "",
               tables.pivot_markdown(uni, "subset", "fraction", metric, col_fmt=_frac)]
        empty_desc = ", ".join(f"{k} {v:.4f}" for k, v in empty.items())
        md += ["### Exact Shapley values of the modalities", "",
               "Over all 2^K - 1 subsets of the sweep (end-to-end test metrics); v(empty) = "
               "the best constant predictor fitted on the training labels, scored on the "
               f"test labels ({empty_desc}; accuracy in points below). Values per modality "
               "sum to v(full) - v(empty).", "",
               tables.markdown(shap, ["fraction", "modality", "shapley_acc_points",
                                      "shapley_risk"],
                               pm=["shapley_acc_points", "shapley_risk"], digits=3)]
        if lazy:
            md += ["### Modality-laziness probe (late fusion)", "",
                   "A head refitted on modality k's block of the jointly trained all-modality "
                   "latent (joint) vs on the latent of the model trained on k alone (alone); "
                   "accuracies in %, risk_gap in nats (joint - alone). acc_gap_points = "
                   "joint - alone: negative = the joint model under-learned modality k.", "",
                   tables.markdown(lazy, ["modality", "joint_acc_pct", "alone_acc_pct",
                                          "acc_gap_points", "risk_gap"],
                                   pm=["joint_acc_pct", "alone_acc_pct", "acc_gap_points",
                                       "risk_gap"], digits=3)]
        cl = claims(res)
        for x in cl:
            x["dataset"] = name
        all_claims += cl

    if all_claims:
        md += ["## The paper's claims, checked", ""]
        for x in all_claims:
            verdict = {True: "holds", False: "does not hold", None: "not checked"}[x["holds"]]
            md.append(f"- [{x['dataset']}] {x['claim']}: **{verdict}** ({x['detail']})")
        md.append("")
    write_json(out / "claims.json", all_claims)
    return write_text_atomic(out / "report.md", "\n".join(md) + "\n")
