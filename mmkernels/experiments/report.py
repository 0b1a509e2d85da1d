"""The results folder: per-seed and aggregated tables, figures, claims and report.md.

Layout of ``out_dir`` (every file written atomically, see :mod:`.io`):

    config.json                       exact configuration, versions, command, runtime
    records.jsonl                     the results store: one record per finished sweep cell
                                      (written by run_sweep, see store.py)
    report.md                         the tables, the checks and the claims, in Markdown
    claims.json                       each checked claim: holds / does not hold + numbers
    table4_per_seed.csv / .json       synthetic: one row per (w, seed, subset)
    table4.csv, table4.md, table4.tex, table4_check.csv, table4_mse.{png,pdf,svg}
    <ds>_per_seed.json                every per-seed record of dataset <ds>
    <ds>_subsets_per_seed.csv         one row per (seed, fraction, subset)
    <ds>_pairs_per_seed.csv, <ds>_refit_per_seed.csv, <ds>_probe_per_seed.csv
    <ds>_table1.{csv,md,tex}  _table2.*  _table3.*  _eta.*   aggregated tables (mean ± std)
    <ds>_unimodal.csv  _shapley.csv  _laziness.csv
    <ds>_diverged.csv                 the cells whose training diverged (only if any): their
                                      subsets and epochs; they are in no other table
    <ds>_accuracy_vs_fraction.{png,pdf,svg}, <ds>_f1_macro_vs_fraction.* (classification)

The .tex files are booktabs tables (:mod:`.latex`): mean ± std with the number of seeds in
the caption, the best value of each column in bold (higher or lower, as the metric wants).
The end-to-end test metrics are mmkernels.metrics' (accuracy = weighted accuracy WA, UA,
macro / weighted F1; MSE, MAE, Pearson r), computed once per cell in the sweep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import figures, tables
from .io import write_csv, write_json, write_text_atomic
from .latex import Column, Tex, booktabs, pivot_booktabs
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
    if not agg:
        return [{"claim": "the paper's claims", "holds": None,
                 "detail": "not checked: every cell diverged"}]
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


def _complete_cells(rows: Sequence[dict], data: Prepared) -> list[dict]:
    """The subset records of the cells that hold every subset with finite metrics (the
    exact Shapley values need all of them); a diverged cell has none."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["fraction"], r["seed"]), []).append(r)
    needs = ["test_loss"] + (["test_acc"] if data.task == "classification" else [])
    return [r for grp in cells.values()
            if {r["subset"] for r in grp} == set(data.subset_names)
            and all(r.get(k) is not None for r in grp for k in needs) for r in grp]


def _diverged_markdown(rows: Sequence[dict]) -> list[str]:
    """The report's list of diverged cells: one line per cell, its subsets and epochs."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["fraction"], r["seed"]), []).append(r)
    lines = ["### Diverged cells", "",
             f"{len(cells)} cell(s) diverged: a training loss or a parameter was not finite "
             "(NaN or Inf). They are left out of every table, figure and claim of this "
             "dataset; a lower --lr or rescaled features may avoid it.", ""]
    for (fraction, seed), grp in sorted(cells.items()):
        what = ", ".join(f"{r['subset']} ({r['detected_in']}"
                         + (f", epoch {r['epoch']})" if r.get("epoch") is not None else ")")
                         for r in grp)
        lines.append(f"- fraction {fraction:g}, seed {seed}: {what}")
    return [*lines, ""]


def _parse(data: Prepared):
    index = dict(zip(data.subset_names, data.subsets, strict=True))
    return lambda name: index[name]


def _frac(f: float) -> str:
    return f"{f:g}"


def _frac_tex(f: float) -> Tex:
    """A fraction as LaTeX: a power of ten as $10^{-4}$, others as $0.3$."""
    e = math.log10(f) if f > 0 else 0.5
    if abs(e - round(e)) < 1e-9:
        return Tex(f"$10^{{{round(e)}}}$" if round(e) else "$1$")
    return Tex(f"${f:g}$")


def _pm_columns(ms: Sequence[tables.Metric]) -> list[Column]:
    return [Column(m.key, m.label, pm=True, best="max" if m.higher_is_better else "min",
                   digits=m.digits) for m in ms]


def _write_table(out: Path, stem: str, md: str, tex: str) -> None:
    """The Markdown and LaTeX renderings of one table, beside its CSV."""
    write_text_atomic(out / f"{stem}.md", md)
    write_text_atomic(out / f"{stem}.tex", tex)


def _where(d: Prepared) -> str:
    return (f"{d.name}: {d.num_modalities} modalities {', '.join(d.modality_names)}; "
            f"{d.train_y.shape[0]} train / {d.test_y.shape[0]} test rows")


def _table1_section(out: Path, res: RealResult, t1: list[dict]) -> list[str]:
    """Table 1 (every metric of every subset at the largest fraction): Markdown and LaTeX."""
    d, c = res.data, res.cfg
    ms = tables.metrics_for(res.data.task)
    top = max(c.fractions)
    md = tables.markdown(t1, ["subset", "size", *(m.key for m in ms)],
                         pm=[m.key for m in ms], headers=["subset", "size",
                                                          *(m.label for m in ms)],
                         digits={m.key: m.digits for m in ms})
    what = ("Accuracy is the weighted accuracy (WA, the fraction of test rows right), UA the "
            "unweighted accuracy (mean per-class recall), F1 macro- and class-weighted."
            if d.task == "classification" else "MSE is the end-to-end test loss, MAE the "
            "mean absolute error, Pearson r the correlation of prediction and target.")
    tex = booktabs(t1, [Column("subset", "subset"), Column("size", "size"), *_pm_columns(ms)],
                   caption=f"Table 1 ({_where(d)}): end-to-end test metrics of every modality "
                           f"subset, trained on fraction {top:g} of the training set "
                           f"({c.fusion} fusion). {what}",
                   label=f"tab:{d.name}-table1")
    _write_table(out, f"{d.name}_table1", md, tex)
    return [f"### Table 1: test metrics of every subset (fraction {top:g})", "", what, "", md]


def _table2_section(out: Path, res: RealResult, t2: list[dict]) -> list[str]:
    """Table 2 (the primary metric against the training fraction): Markdown and LaTeX."""
    d = res.data
    m = tables.metrics_for(res.data.task)[0]
    md = tables.pivot_markdown(t2, "subset", "fraction", m.key, col_fmt=_frac,
                               digits=m.digits)
    tex = pivot_booktabs(t2, "subset", "fraction", m.key,
                         caption=f"Table 2 ({_where(d)}): {m.label} of every subset against "
                                 "the fraction of the training set used.",
                         label=f"tab:{d.name}-table2", row_header="subset",
                         col_header=_frac_tex, best="max" if m.higher_is_better else "min",
                         digits=m.digits)
    _write_table(out, f"{d.name}_table2", md, tex)
    counts = ", ".join(f"{_frac(r['fraction'])}: {r['n_train_mean']:.0f}" for r in t2
                       if r["subset"] == d.subset_names[0])
    return [f"### Table 2: {m.label} against the training fraction", "", md,
            f"n_train per fraction: {counts}. The other metrics per fraction are in "
            f"`{d.name}_table2.csv`.", ""]


def _figures_section(out: Path, res: RealResult, t2: list[dict]) -> list[str]:
    """The metric(s) against the training fraction, one style per subset for all figures."""
    d = res.data
    styles = figures.subset_styles(d.subset_names)
    ms = tables.metrics_for(res.data.task)
    shown = [(ms[0], f"{d.name}_accuracy_vs_fraction")]
    if d.task == "classification":
        shown.append((next(m for m in ms if m.key == "test_f1_macro"),
                      f"{d.name}_f1_macro_vs_fraction"))
    lines = []
    for m, stem in shown:
        figures.accuracy_vs_fraction(t2, out / f"{stem}.png", metric=m.key, ylabel=m.label,
                                     higher_is_better=m.higher_is_better, styles=styles,
                                     title=f"{d.name}: {m.label} against the training fraction")
        lines += [f"![{d.name}: {m.label}]({stem}.png)", ""]
    return lines + ["(Each figure also as `.pdf` and `.svg`.)", ""]


def _table3_section(out: Path, res: RealResult, t3: list[dict]) -> list[str]:
    """Table 3 (gamma of the nested pairs): Markdown and LaTeX."""
    d = res.data
    cls = d.task == "classification"
    keys = ["test_acc_diff_points", "gamma_loss", "gamma_acc_points"] if cls else \
        ["test_loss_diff", "gamma_loss"]
    vals = [m for m in tables.TABLE3_VALUES if m.key in keys]
    lead = ["fraction"] if len(res.cfg.refit_fractions) > 1 else []
    md = tables.markdown(t3, [*lead, "M", "N", *keys], pm=keys, digits=3)
    tex = booktabs(t3, [*(Column(k, k) for k in lead), Column("M", "M"), Column("N", "N"),
                        *_pm_columns(vals)],
                   caption=f"Table 3 ({_where(d)}): nested pairs M ⊃ N, encoders frozen, "
                           "heads refitted. γ in loss units is refit test risk(M) - risk(N) "
                           "(negative = M better); in accuracy points, refit test "
                           "accuracy(M) - (N) (positive = M better). Δ: the same differences "
                           "of the end-to-end models.",
                   label=f"tab:{d.name}-table3")
    _write_table(out, f"{d.name}_table3", md, tex)
    first = ("test_acc_diff_points: end-to-end test accuracy(M) - (N), points, positive = M "
             "better." if cls else "test_loss_diff: end-to-end test MSE(M) - (N), negative "
             "= M better.")
    return ["### Table 3: latent quality of nested pairs M ⊃ N (frozen encoders, "
            "refitted heads)", "",
            f"{first} gamma_loss: refit test risk(M) - risk(N) in "
            f"{'nats' if cls else 'MSE'} (the definition's sign: NEGATIVE = M better)."
            + (" gamma_acc_points: refit test accuracy(M) - (N), points (the paper's Table 3 "
               "sign: positive = M better)." if cls else ""), "",
            f"Refitted heads: {res.cfg.head_l2_text()}.", "", md]


def _eta_section(out: Path, res: RealResult, eta: list[dict]) -> list[str]:
    """The refitted heads per subset and eta: Markdown and LaTeX."""
    d = res.data
    full = d.subset_names[-1]
    vals = [m for m in tables.ETA_VALUES
            if d.task == "classification" or m.key != "refit_test_acc"]
    lead = ["fraction"] if len(res.cfg.refit_fractions) > 1 else []
    md = tables.markdown(eta, [*lead, "subset", *(m.key for m in vals)],
                         pm=[m.key for m in vals], digits={m.key: m.digits for m in vals},
                         headers=[*lead, "subset", *(m.label for m in vals)])
    risk = "cross-entropy in nats" if d.task == "classification" else "MSE"
    tex = booktabs(eta, [*(Column(k, k) for k in lead), Column("subset", "subset"),
                         *_pm_columns(vals)],
                   caption=f"Latent quality ({_where(d)}): heads refitted on every subset's "
                           f"frozen encoder; risk = {risk}. η = refit test risk - that of "
                           f"{full} (the reference, so an estimate: negative = better than "
                           "the all-modality subset's refit).",
                   label=f"tab:{d.name}-eta")
    _write_table(out, f"{d.name}_eta", md, tex)
    return ["### Latent quality per subset: refitted heads and eta", "",
            f"refit test risk: {risk} of the head refitted on the frozen encoder (and its "
            f"accuracy, for classification); η = refit test risk - that of {full} in the same "
            "seed (an estimate of the paper's eta with the all-modality refit as reference; "
            "smaller is better).", "", md]


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
        seeds = len({r["seed"] for r in table4_rows})
        tex = pivot_booktabs(
            [r for r in t4 if r["subset"] in paper_sub], "subset", "w", "test_mse",
            caption=f"Synthetic data (Table 4): test MSE of the ridge head refitted on the "
                    f"raw features of subsets {{1}} to {{1,2,3,4}} of 4 modalities with "
                    f"overlap w ({table4_rows[0]['n_train']} train / "
                    f"{table4_rows[0]['n_test']} test rows).",
            label="tab:table4", row_header="subset", col_header=lambda w: Tex(f"$w = {w}$"),
            best="min")
        _write_table(out, "table4", grid, tex)
        figures.mse_vs_modalities(t4, out / "table4_mse.png")
        n_ok = sum(c["ok"] for c in check)
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
               "cells pass).", "", "![Table 4](table4_mse.png)",
               "(Also `table4_mse.pdf` / `.svg`; LaTeX: `table4.tex`.)", ""]

    for res in real:
        d, recs, name = res.data, res.records, res.data.name
        write_json(out / f"{name}_per_seed.json", {"config": res.cfg.to_dict(), **recs})
        for key in ("subsets", "pairs", "refit", "probe"):
            if recs[key]:
                write_csv(out / f"{name}_{key}_per_seed.csv", recs[key])
        diverged = recs.get("diverged", [])
        if diverged:
            write_csv(out / f"{name}_diverged.csv", diverged)
        t1 = tables.table1(recs["subsets"], max(res.cfg.fractions))
        t2 = tables.table2(recs["subsets"])
        t3 = tables.table3(recs["pairs"])
        uni = tables.unimodal(recs["subsets"])
        lazy = tables.laziness(recs["probe"])
        shap, empty = tables.shapley_table(
            _complete_cells(recs["subsets"], d), d.modality_names, _parse(d),
            d.train_y.numpy(), d.test_y.numpy(), d.task,
            d.num_outputs if d.task == "classification" else None)
        for fname, rows in (("table1", t1), ("table2", t2), ("table3", t3),
                            ("unimodal", uni), ("shapley", shap), ("laziness", lazy)):
            if rows:
                write_csv(out / f"{name}_{fname}.csv", rows)
        metric = tables.metrics_for(d.task)[0].key
        eta = tables.eta_table(recs["refit"], d.subset_names[-1])
        if eta:
            write_csv(out / f"{name}_eta.csv", eta)
        c = res.cfg
        md += [f"## {name}: {d.num_modalities} modalities "
               f"({', '.join(d.modality_names)}), {d.train_y.shape[0]} train / "
               f"{d.test_y.shape[0]} test", "",
               f"Model: {c.fusion} fusion, hidden {c.hidden}, Adam lr {c.lr}, batch "
               f"{c.batch_size}, {c.epochs} epochs, weight decay {c.weight_decay}, seeds "
               f"{c.seeds}. Training fractions: {SAMPLING_RULE}.", ""]
        if diverged:
            md += _diverged_markdown(diverged)
        md += [*_table1_section(out, res, t1), *_table2_section(out, res, t2)]
        if t2:  # not when every cell diverged
            md += _figures_section(out, res, t2)
        if t3:
            md += _table3_section(out, res, t3)
        if eta:
            md += _eta_section(out, res, eta)
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
