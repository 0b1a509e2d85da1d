"""PNG figures in the paper's form (matplotlib, Agg backend, written atomically).

* accuracy_vs_fraction: test accuracy against the training fraction, one line per subset
  (error bars = std over seeds), log x axis (Table 2's form);
* mse_vs_modalities: Table 4's test MSE against the number of modalities, one line per
  overlap w, with the paper's values as open markers.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .io import write_bytes_atomic

__all__ = ["accuracy_vs_fraction", "mse_vs_modalities"]


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_fraction(table2_rows: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                         *, title: str = "", max_lines: int = 15) -> Path:
    """Table 2 as a figure: metric against the training fraction per subset, log x."""
    plt = _plt()
    metric = "test_acc" if table2_rows and table2_rows[0].get("test_acc_mean") is not None \
        else "test_loss"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    subsets = list(dict.fromkeys(r["subset"] for r in table2_rows))[-max_lines:]
    cmap = plt.get_cmap("viridis")
    sizes = [r["size"] for r in table2_rows]
    kmax = max(sizes) if sizes else 1
    for s in subsets:
        rows = sorted((r for r in table2_rows if r["subset"] == s), key=lambda r: r["fraction"])
        size = rows[0]["size"]
        ax.errorbar([r["fraction"] for r in rows], [r[f"{metric}_mean"] for r in rows],
                    yerr=[r[f"{metric}_std"] for r in rows], label=s, capsize=2,
                    lw=1 + size / kmax * 1.5, color=cmap((size - 1) / max(kmax - 1, 1) * 0.9))
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel("test accuracy (%)" if metric == "test_acc" else "test loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return _save(fig, path)


def mse_vs_modalities(table4_rows: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                      *, title: str = "Table 4: test MSE against the number of modalities"
                      ) -> Path:
    """Table 4 as a figure: subsets {1}, {1,2}, ... (x = size), one line per w."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    chain = [r for r in table4_rows if r["subset"] == "{" + ",".join(
        str(k + 1) for k in range(r["size"])) + "}"]
    for w in sorted({r["w"] for r in chain}, reverse=True):
        rows = sorted((r for r in chain if r["w"] == w), key=lambda r: r["size"])
        line = ax.errorbar([r["size"] for r in rows], [r["test_mse_mean"] for r in rows],
                           yerr=[r["test_mse_std"] for r in rows], marker="o", capsize=2,
                           label=f"w = {w}")
        paper = [(r["size"], r["paper_mse"]) for r in rows if r.get("paper_mse") is not None]
        if paper:
            ax.plot(*zip(*paper, strict=True), ls="none", marker="s", mfc="none",
                    color=line[0].get_color())
    ax.set_xlabel("number of modalities k (subset {1..k})")
    ax.set_ylabel("test MSE")
    ax.set_xticks(sorted({r["size"] for r in chain}))
    ax.set_title(title + "\n(lines: ours; open squares: paper)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
