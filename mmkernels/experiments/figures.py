"""Figures in the paper's form (matplotlib, Agg backend), each written as PNG (150 dpi), PDF
and SVG side by side, atomically.

* accuracy_vs_fraction: a test metric (accuracy by default) against the training fraction on a
  log x axis, one line per subset with the std over seeds as error bars (Table 2's form);
* mse_vs_modalities: Table 4's test MSE against the number of modalities k (subsets
  {1}, {1,2}, ...), one line per overlap w, with the paper's values as open markers.

Every subset has its own colour and marker (:func:`subset_styles`): a qualitative palette of
20 colours (tab10's, then their light tints) cycling with 13 markers, so all 255 subsets of 8
modalities get distinct (colour, marker) pairs, and the style depends only on the subset's
position in the dataset's subset list: figures drawn with the same list agree. Line width grows
with the subset's size. Past :data:`MAX_LINES` subsets a figure highlights the uni-modal
subsets, the all-modality one and the three best at the largest fraction, each in its own
style, and draws the others as thin grey lines.

PDF and SVG carry no creation date (and SVG ids a fixed salt), so the same data give the same
files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import write_bytes_atomic

__all__ = ["accuracy_vs_fraction", "mse_vs_modalities", "subset_styles", "MAX_LINES",
           "FORMATS"]

#: A figure with more subsets than this highlights a few and greys the rest.
MAX_LINES = 15
#: The formats every figure is written in, beside one another (same stem).
FORMATS = ("png", "pdf", "svg")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*", "d")
_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _palette() -> list[tuple[float, ...]]:
    """tab20 reordered: the ten strong colours (= tab10) first, then their light tints."""
    cmap = _plt().get_cmap("tab20")
    return [cmap(i) for i in range(0, 20, 2)] + [cmap(i) for i in range(1, 20, 2)]


def subset_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{subset name: {"color", "marker"}} by position in ``names``: colour i mod 20, marker
    i mod 13, so the first 260 subsets all differ (in colour or marker, usually both)."""
    colours = _palette()
    return {name: {"color": colours[i % len(colours)], "marker": MARKERS[i % len(MARKERS)]}
            for i, name in enumerate(names)}


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write the figure as ``path`` with each suffix of FORMATS; returns the PNG's path."""
    plt = _plt()
    png = Path(path).with_suffix(".png")
    try:
        with plt.rc_context({"svg.hashsalt": "mmkernels", "pdf.compression": 6}):
            for fmt in FORMATS:
                buf = io.BytesIO()
                fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight",
                            metadata=_METADATA[fmt])
                write_bytes_atomic(png.with_suffix(f".{fmt}"), buf.getvalue())
    finally:
        plt.close(fig)
    return png


def _highlighted(rows: Sequence[dict[str, Any]], subsets: Sequence[str], metric: str,
                 higher_is_better: bool) -> list[str]:
    """The uni-modal subsets, the largest one and the three best at the largest fraction."""
    sizes = {r["subset"]: r["size"] for r in rows}
    kmax = max(sizes.values())
    keep = [s for s in subsets if sizes[s] == 1 or sizes[s] == kmax]
    top = max(r["fraction"] for r in rows)
    last = [r for r in rows if r["fraction"] == top and r.get(f"{metric}_mean") is not None]
    last.sort(key=lambda r: r[f"{metric}_mean"], reverse=higher_is_better)
    keep += [r["subset"] for r in last[:3]]
    wanted = set(keep)
    return [s for s in subsets if s in wanted]


def accuracy_vs_fraction(table2_rows: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                         *, title: str = "", metric: str | None = None,
                         ylabel: str | None = None, higher_is_better: bool | None = None,
                         styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Table 2 as a figure: ``metric`` (a field of the aggregated rows, with _mean and _std;
    default test_acc when present, else test_loss) against the training fraction, log x,
    one line per subset. ``styles``: :func:`subset_styles` of the dataset's subsets (default:
    of the subsets in the rows, in order). Returns the PNG's path."""
    plt = _plt()
    if metric is None:
        metric = "test_acc" if table2_rows and table2_rows[0].get("test_acc_mean") is not None \
            else "test_loss"
    if higher_is_better is None:
        higher_is_better = "loss" not in metric
    subsets = list(dict.fromkeys(r["subset"] for r in table2_rows))
    styles = styles or subset_styles(subsets)
    missing = [s for s in subsets if s not in styles]
    if missing:
        raise ValueError(f"styles: no style for subsets {missing[:5]}")
    sizes = {r["subset"]: r["size"] for r in table2_rows}
    kmax = max(sizes.values(), default=1)
    shown = subsets if len(subsets) <= MAX_LINES else \
        _highlighted(table2_rows, subsets, metric, higher_is_better)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))

    def series(s: str) -> tuple[list, list, list]:
        rows = sorted((r for r in table2_rows if r["subset"] == s
                       and r.get(f"{metric}_mean") is not None), key=lambda r: r["fraction"])
        return ([r["fraction"] for r in rows], [r[f"{metric}_mean"] for r in rows],
                [r[f"{metric}_std"] or 0.0 for r in rows])

    greyed = [s for s in subsets if s not in shown]
    for i, s in enumerate(greyed):
        x, y, _ = series(s)
        ax.plot(x, y, color="0.6", lw=0.6, alpha=0.5, zorder=1,
                label=f"other subsets ({len(greyed)})" if i == 0 else None)
    for s in shown:
        x, y, e = series(s)
        width = 1.0 + 1.3 * (sizes[s] - 1) / max(kmax - 1, 1)
        ax.errorbar(x, y, yerr=e, label=s, color=styles[s]["color"],
                    marker=styles[s]["marker"], markersize=5, lw=width, capsize=2,
                    elinewidth=0.8, zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the training set (log scale)")
    ax.set_ylabel(ylabel or ("test accuracy (%)" if metric == "test_acc" else metric))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if greyed:  # the grey entry last, after the highlighted subsets
        handles, labels = handles[1:] + handles[:1], labels[1:] + labels[:1]
    ax.legend(handles, labels, fontsize=8, title="subset", title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(labels) <= 16 else 2,
              frameon=False)
    return _save(fig, path)


def mse_vs_modalities(table4_rows: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                      *, title: str = "Table 4: test MSE against the number of modalities"
                      ) -> Path:
    """Table 4 as a figure: subsets {1}, {1,2}, ... (x = their size k), one line per w,
    each w its own colour and marker; the paper's cells as larger open markers."""
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    chain = [r for r in table4_rows if r["subset"] == "{" + ",".join(
        str(k + 1) for k in range(r["size"])) + "}"]
    colours = _palette()
    ws = sorted({r["w"] for r in chain}, reverse=True)
    for i, w in enumerate(ws):
        rows = sorted((r for r in chain if r["w"] == w), key=lambda r: r["size"])
        colour, marker = colours[i % len(colours)], MARKERS[i % len(MARKERS)]
        ax.errorbar([r["size"] for r in rows], [r["test_mse_mean"] for r in rows],
                    yerr=[r["test_mse_std"] for r in rows], marker=marker, color=colour,
                    capsize=2, markersize=5, label=f"w = {w}", zorder=2)
        paper = [(r["size"], r["paper_mse"]) for r in rows if r.get("paper_mse") is not None]
        if paper:
            ax.plot(*zip(*paper, strict=True), ls="none", marker=marker, markersize=11,
                    mfc="none", mew=1.2, color=colour, zorder=3)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], ls="none", marker="o", markersize=10, mfc="none",
                          color="0.3", label="paper (open markers)"))
    ax.set_xlabel("number of modalities k (subset {1, ..., k})")
    ax.set_ylabel("test MSE")
    ax.set_xticks(sorted({r["size"] for r in chain}))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    return _save(fig, path)
