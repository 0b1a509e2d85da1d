"""Booktabs LaTeX tables of aggregated rows (mean ± std over seeds), for a paper.

:func:`booktabs` renders rows as a ``table`` float (a ``longtable`` past ``LONG_ROWS`` rows)
with ``\\toprule`` / ``\\midrule`` / ``\\bottomrule``; :func:`pivot_booktabs` a row-by-column
grid of one value. Cells of a "mean ± std" column read ``$m \\pm s$``. The caption states
the number of seeds and, where a column names a direction, that the best value of the column
is in bold: the largest or the smallest mean at the printed precision (every mean equal to it
there is bold; a column with fewer than two values has none).

Text is escaped (:func:`escape`): LaTeX's special characters, and ±, ⊃, ≥ and a few other
symbols as math. A :class:`Tex` string is already LaTeX and passes unchanged. The output is
ASCII unless the text itself has other characters (e.g. a modality's name), which then need
UTF-8 input (LaTeX's default since 2018). Needs ``\\usepackage{booktabs}`` (and
``\\usepackage{longtable}`` for a long table).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Tex", "Column", "escape", "booktabs", "pivot_booktabs", "seeds_phrase",
           "LONG_ROWS"]

#: Tables with more rows than this become a longtable, which breaks across pages.
LONG_ROWS = 40

Row = dict[str, Any]


class Tex(str):
    """Text that is already LaTeX: :func:`escape` returns it unchanged."""


_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
    "±": r"$\pm$", "⊃": r"$\supset$", "⊂": r"$\subset$", "≥": r"$\geq$", "≤": r"$\leq$",
    "×": r"$\times$", "−": "-", "–": "--", "—": "---", "η": r"$\eta$", "γ": r"$\gamma$",
    "Δ": r"$\Delta$",
}


def escape(text: Any) -> str:
    """``text`` as LaTeX: special characters escaped; a :class:`Tex` string unchanged."""
    if isinstance(text, Tex):
        return str(text)
    return "".join(_SPECIAL.get(ch, ch) for ch in str(text))


@dataclass(frozen=True)
class Column:
    """One column: the row field ``key`` (with ``pm``: the fields ``key_mean`` and
    ``key_std`` as "mean ± std"), its ``header`` (plain text, or :class:`Tex`), the decimals,
    and ``best``: "max" or "min" to set the best mean of the column in bold, None for none."""

    key: str
    header: str
    pm: bool = False
    best: str | None = None
    digits: int = 2

    def __post_init__(self) -> None:
        if self.best not in (None, "max", "min"):
            raise ValueError(f'Column {self.key!r}: best must be "max", "min" or None, got '
                             f"{self.best!r}")
        if self.best is not None and not self.pm:
            raise ValueError(f"Column {self.key!r}: best needs a mean ± std column (pm=True)")


def _num(v: float, digits: int) -> str:
    s = f"{v:.{digits}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.00"


def _plain(v: Any, digits: int) -> str:
    if v is None:
        return "--"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"${_num(v, digits)}$"
    return escape(v)


def _best(rows: Sequence[Row], col: Column) -> float | None:
    means = [round(float(r[f"{col.key}_mean"]), col.digits) for r in rows
             if r.get(f"{col.key}_mean") is not None]
    if col.best is None or len(means) < 2:
        return None
    return max(means) if col.best == "max" else min(means)


def _pm(row: Row, col: Column, best: float | None) -> str:
    mean, std = row.get(f"{col.key}_mean"), row.get(f"{col.key}_std")
    if mean is None:
        return "--"
    m = _num(float(mean), col.digits)
    if best is not None and round(float(mean), col.digits) == best:
        m = rf"\mathbf{{{m}}}"
    return f"${m} \\pm {_num(float(std or 0.0), col.digits)}$"


def seeds_phrase(rows: Sequence[Row]) -> str:
    """ "over 5 seeds" from the rows' n_seeds (a range when they differ)."""
    counts = sorted({int(r["n_seeds"]) for r in rows if r.get("n_seeds") is not None})
    if not counts:
        return ""
    if len(counts) == 1:
        return f"over {counts[0]} seed{'s' if counts[0] != 1 else ''}"
    return f"over {counts[0]} to {counts[-1]} seeds (per row: n\\_seeds in the CSV)"


def _direction_phrase(columns: Sequence[Column]) -> str:
    ranked = [c for c in columns if c.best is not None]
    if not ranked:
        return ""
    kinds = {c.best for c in ranked}
    if len(kinds) == 1:
        word = "higher" if kinds == {"max"} else "lower"
        return f" Best value per column in bold ({word} is better)."
    hi = "; ".join(escape(c.header) for c in ranked if c.best == "max")
    lo = "; ".join(escape(c.header) for c in ranked if c.best == "min")
    return f" Best value per column in bold. Higher is better: {hi}. Lower is better: {lo}."


def _label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9:.-]", "-", label)


def booktabs(rows: Sequence[Row], columns: Sequence[Column], *, caption: str, label: str,
             long: bool | None = None, seeds: str | None = None) -> str:
    """A booktabs table of ``rows``; see the module docstring. ``caption`` is plain text
    (escaped; a :class:`Tex` passes as is), followed by the seeds (``seeds``, default
    :func:`seeds_phrase` of the rows) and the bold rule; ``long`` forces a longtable (True)
    or a float (False), default by the row count."""
    if not columns:
        raise ValueError("columns: expected at least one column, got none")
    best = {c.key: _best(rows, c) for c in columns}
    body = [" & ".join(_pm(r, c, best[c.key]) if c.pm else _plain(r.get(c.key), c.digits)
                       for c in columns) + r" \\" for r in rows]
    head = " & ".join(escape(c.header) for c in columns) + r" \\"
    spec = "@{}" + "".join("r" if c.pm else "l" for c in columns) + "@{}"
    seeds = seeds_phrase(rows) if seeds is None else seeds
    cap = escape(caption).rstrip()
    if seeds and any(c.pm for c in columns):
        cap += rf" Mean $\pm$ sample standard deviation {seeds}."
    cap += _direction_phrase(columns)
    if long is None:
        long = len(rows) > LONG_ROWS
    lines = [r"% Generated by mmkernels. Needs \usepackage{booktabs}"
             + (r" and \usepackage{longtable}." if long else ".")]
    if long:
        lines += [rf"\begin{{longtable}}{{{spec}}}",
                  rf"\caption{{{cap}}}\label{{{_label(label)}}} \\",
                  r"\toprule", head, r"\midrule", r"\endfirsthead",
                  r"\toprule", head, r"\midrule", r"\endhead",
                  r"\bottomrule", r"\endfoot", *body, r"\end{longtable}"]
    else:
        lines += [r"\begin{table}[t]", r"\centering", rf"\caption{{{cap}}}",
                  rf"\label{{{_label(label)}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                  head, r"\midrule", *body, r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def pivot_booktabs(rows: Sequence[Row], row_key: str, col_key: str, value: str, *,
                   caption: str, label: str, row_header: str | None = None,
                   col_header: Callable[[Any], str] = str, best: str | None = None,
                   digits: int = 2) -> str:
    """A grid: one line per ``row_key`` value, one column per ``col_key`` value (headed by
    ``col_header(value)``, plain text or :class:`Tex`), cells "mean ± std" of ``value``; with
    ``best`` ("max" / "min") the best of each column is bold."""
    rk = list(dict.fromkeys(r[row_key] for r in rows))
    ck = list(dict.fromkeys(r[col_key] for r in rows))
    grid = {(r[row_key], r[col_key]): r for r in rows}
    wide = []
    for a in rk:
        line: Row = {row_key: a}
        for j, c in enumerate(ck):
            cell = grid.get((a, c), {})
            line[f"c{j}_mean"] = cell.get(f"{value}_mean")
            line[f"c{j}_std"] = cell.get(f"{value}_std")
        wide.append(line)
    cols = [Column(row_key, row_header or row_key)] + [
        Column(f"c{j}", col_header(c), pm=True, best=best, digits=digits)
        for j, c in enumerate(ck)]
    return booktabs(wide, cols, caption=caption, label=label, seeds=seeds_phrase(rows))
