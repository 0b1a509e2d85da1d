"""Figures: one style per subset, the paper's axes, PNG + PDF + SVG, reproducible files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmkernels.experiments import figures
from mmkernels.subsets import all_subsets, modality_labels, subset_name

FRACTIONS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def table2_rows(k: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """Aggregated Table 2 rows of every subset of k modalities (made-up accuracies)."""
    rng = np.random.default_rng(seed)
    names = [subset_name(s, modality_labels(k)) for s in all_subsets(k)]
    rows = [{"subset": n, "size": len(s), "fraction": f,
             "test_acc_mean": float(30 + 5 * len(s) + 10 * np.log10(f) + rng.normal()),
             "test_acc_std": float(rng.uniform(0, 2)),
             "test_loss_mean": float(1 / len(s) + rng.uniform()), "test_loss_std": 0.1}
            for n, s in zip(names, all_subsets(k), strict=True) for f in FRACTIONS]
    return names, rows


@pytest.fixture
def drawn(monkeypatch):
    """Capture the figures instead of writing them: a list of (figure, path)."""
    got = []

    def keep(fig, path):
        got.append((fig, path))
        return Path(path)

    monkeypatch.setattr(figures, "_save", keep)
    return got


def test_every_subset_of_eight_modalities_gets_its_own_style() -> None:
    names = [subset_name(s, modality_labels(8)) for s in all_subsets(8)]
    styles = figures.subset_styles(names)
    pairs = {(tuple(v["color"]), v["marker"]) for v in styles.values()}
    assert len(names) == 255 and len(pairs) == 255
    # Neighbours in the list (e.g. T, A, V) differ in colour AND marker.
    for a, b in zip(names, names[1:], strict=False):
        assert styles[a]["color"] != styles[b]["color"]
        assert styles[a]["marker"] != styles[b]["marker"]
    # The style is the subset's position in the list: the same list, the same styles.
    assert figures.subset_styles(names[:7]) == {n: styles[n] for n in names[:7]}


def test_accuracy_figure_styles_and_axes(drawn) -> None:
    names, rows = table2_rows(3)
    styles = figures.subset_styles(names)
    figures.accuracy_vs_fraction(rows, "x.png", styles=styles)
    figures.accuracy_vs_fraction(rows, "y.png", metric="test_loss", styles=styles,
                                 ylabel="cross-entropy")
    for fig, _ in drawn:
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and "fraction" in ax.get_xlabel()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == names
        lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar: its data line
        assert list(lines) == names
        for name, line in lines.items():
            assert line.get_marker() == styles[name]["marker"]
            assert tuple(line.get_color()) == tuple(styles[name]["color"])
    assert drawn[1][0].axes[0].get_ylabel() == "cross-entropy"
    # The data: the full subset's line holds its means in fraction order.
    full = [r["test_acc_mean"] for r in rows if r["subset"] == "ABC"]
    assert len(full) == len(FRACTIONS)
    ys = [list(line.get_ydata()) for line in drawn[0][0].axes[0].lines]
    assert full in ys


def test_many_subsets_highlight_a_few_and_grey_the_rest(drawn) -> None:
    names, rows = table2_rows(5)  # 31 subsets > MAX_LINES
    figures.accuracy_vs_fraction(rows, "x.png", styles=figures.subset_styles(names))
    labels = [t.get_text() for t in drawn[0][0].axes[0].get_legend().get_texts()]
    best = sorted((r for r in rows if r["fraction"] == 1.0),
                  key=lambda r: -r["test_acc_mean"])[:3]
    want = [n for n in names if len(n) in (1, 5) or n in {r["subset"] for r in best}]
    assert labels == want + [f"other subsets ({len(names) - len(want)})"]
    # For a loss the best are the lowest.
    low = figures._highlighted(rows, names, "test_loss", higher_is_better=False)
    lowest = sorted((r for r in rows if r["fraction"] == 1.0),
                    key=lambda r: r["test_loss_mean"])[:3]
    assert {r["subset"] for r in lowest} <= set(low)


def test_table4_figure_keeps_the_papers_axes(drawn) -> None:
    rows = [{"subset": "{" + ",".join(str(j + 1) for j in range(k)) + "}", "size": k, "w": w,
             "test_mse_mean": 100 * (4 - k) * (1 - w) ** 2, "test_mse_std": 1.0,
             "paper_mse": 100 * (4 - k) * (1 - w) ** 2} for w in (1.0, 0.5, 0.0)
            for k in range(1, 5)]
    rows.append({"subset": "{2}", "size": 1, "w": 0.5, "test_mse_mean": 1e3,
                 "test_mse_std": 0.0, "paper_mse": None})  # not on the chain: not drawn
    figures.mse_vs_modalities(rows, "t4.png")
    ax = drawn[0][0].axes[0]
    assert ax.get_xscale() == "linear" and "number of modalities" in ax.get_xlabel()
    assert ax.get_ylabel() == "test MSE" and list(ax.get_xticks()) == [1, 2, 3, 4]
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["w = 1.0", "w = 0.5", "w = 0.0", "paper (open markers)"]
    styles = {(tuple(c.lines[0].get_color()), c.lines[0].get_marker()) for c in ax.containers}
    assert len(ax.containers) == 3 and len(styles) == 3 and len({m for _, m in styles}) == 3
    assert max(max(line.get_ydata(), default=0) for line in ax.lines) < 1e3


def test_three_formats_written_and_reproducible(tmp_path: Path) -> None:
    names, rows = table2_rows(2)
    png = figures.accuracy_vs_fraction(rows, tmp_path / "a.png", title="t")
    assert png == tmp_path / "a.png"
    heads = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    first = {}
    for fmt, magic in heads.items():
        data = (tmp_path / f"a.{fmt}").read_bytes()
        assert data.startswith(magic), fmt
        first[fmt] = data
    assert b"<svg" in first["svg"]
    figures.accuracy_vs_fraction(rows, tmp_path / "a.png", title="t")
    for fmt in heads:  # no dates or random ids: the same data give the same files
        assert (tmp_path / f"a.{fmt}").read_bytes() == first[fmt], fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pdf", "a.png", "a.svg"]
    with pytest.raises(ValueError, match="styles: no style for subsets"):
        figures.accuracy_vs_fraction(rows, tmp_path / "b.png", styles={"A": {}})
