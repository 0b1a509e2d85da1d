"""Latent quality by head refits: eta per subset and gamma per pair of subsets (docs/paper.md).

For each subset s with frozen encoder g_s, the best linear head is refitted on the training
set (mmkernels.heads.fit) and its risk measured on train and test. Then

* eta(s) = refit test risk(s) - reference risk. The reference is the Bayes risk when given
  (synthetic data: eta is then the paper's eta, >= 0 up to noise), otherwise the refit test risk
  of the all-modality subset (an estimate: eta can then be negative). Every report says which.
* gamma(M, N) = refit test risk(M) - refit test risk(N), in loss units with the paper's sign:
  NEGATIVE = M's representation is better. It is also reported as an accuracy gain in points,
  100 * (test accuracy(M) - test accuracy(N)): POSITIVE = M better (classification only).

Risks are the mean squared error (regression) or the mean cross-entropy in nats
(classification) of the refitted heads, unpenalised.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from mmkernels import heads as _heads
from mmkernels.markdown import markdown_table
from mmkernels.subsets import all_subsets, is_subset, modality_labels, subset_name

__all__ = ["QualityTable", "refit_quality", "SIGN_CONVENTIONS"]

SIGN_CONVENTIONS = (
    "eta = refit test risk - reference risk (smaller is better). "
    "gamma_loss(M, N) = refit test risk(M) - refit test risk(N): negative = M better. "
    "gamma_acc_points(M, N) = 100 * (test accuracy(M) - test accuracy(N)): positive = M better."
)


@dataclass
class QualityTable:
    """One row per subset (rows) and one per compared pair (pairs), plain dicts.

    rows keys: subset, modalities, train_risk, test_risk, train_accuracy, test_accuracy, eta,
    converged. pairs keys: M, N, nested, gamma_loss (negative = M better),
    gamma_acc_points (positive = M better; None for regression).
    """

    task: str
    reference: str
    reference_risk: float
    rows: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)

    def header(self) -> str:
        risk = "mean squared error" if self.task == "regression" else "mean cross-entropy (nats)"
        return (f"task: {self.task}; risk: {risk}; eta reference: {self.reference} = "
                f"{self.reference_risk:.6g}. {SIGN_CONVENTIONS}")

    def to_markdown(self) -> str:
        out = [self.header(), ""]
        out.append(_markdown(self.rows, ["subset", "train_risk", "test_risk", "train_accuracy",
                                         "test_accuracy", "eta", "converged"]))
        if self.pairs:
            out += ["gamma_loss: loss units, negative = M better; gamma_acc_points: accuracy "
                    "points, positive = M better.", ""]
            out.append(_markdown(self.pairs, ["M", "N", "nested", "gamma_loss",
                                              "gamma_acc_points"]))
        return "\n".join(out)

    def to_csv(self, table: str = "subsets") -> str:
        """CSV of table "subsets" (rows) or "pairs"; the first line is a '#' comment with the
        reference and the sign conventions."""
        if table not in ("subsets", "pairs"):
            raise ValueError(f"table must be 'subsets' or 'pairs', got {table!r}")
        data = self.rows if table == "subsets" else self.pairs
        buf = io.StringIO()
        buf.write(f"# {self.header()}\n")
        if data:
            writer = csv.DictWriter(buf, fieldnames=list(data[0]), lineterminator="\n")
            writer.writeheader()
            for row in data:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        return buf.getvalue()


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _markdown(data: list[dict], keys: list[str]) -> str:
    return markdown_table(keys, [[_fmt(row[k]) for k in keys] for row in data])


def refit_quality(
    encoder: Callable[[list[Tensor]], Tensor],
    train_xs: Sequence[Tensor],
    train_y: Tensor,
    test_xs: Sequence[Tensor],
    test_y: Tensor,
    *,
    task: str,
    subsets: Sequence[Sequence[int]] | None = None,
    names: Sequence[str] | None = None,
    reference: str | Sequence[int] | None = None,
    pairs: Sequence[tuple[str | Sequence[int], str | Sequence[int]]] | None = None,
    bayes_risk: float | None = None,
    l2: float | None = None,
    class_weight: str | Tensor | None = None,
    num_classes: int | None = None,
    memory_budget: int = _heads.DEFAULT_MEMORY_BUDGET,
) -> QualityTable:
    """Refit heads on every subset's frozen encoder and tabulate eta and gamma.

    Args:
        encoder: maps a list of K modality tensors [r, d_k] to [S, r, H], row s being the
            representation of subsets[s] (e.g. a SubsetEnsemble's encoders). Called on row
            chunks of at most memory_budget bytes of output, under torch.no_grad().
        train_xs, train_y, test_xs, test_y: K modality tensors [n, d_k] and targets (float
            [n] / [n, T] for regression, int labels [n] for classification).
        task: "regression" or "classification".
        subsets: the modality tuple of each encoder output row; default all_subsets(K).
        names: a name per subset; default letters A, B, C, ... per modality ("AC").
        reference: None (Bayes risk when given, else the subset holding every modality), or a
            subset (tuple or name) whose refit test risk is the eta reference.
        pairs: extra (M, N) pairs for gamma, by tuple or name; every strictly nested pair
            M subset of N is always included.
        bayes_risk: the Bayes risk in the task's risk units, when known.
        l2, class_weight, num_classes: passed to mmkernels.heads.fit; for classification
            num_classes defaults to 1 + the largest label of train_y AND test_y, so a class
            seen only in the test set gets a head column (never fitted to, so it is scored as
            unlikely) instead of an error.
        memory_budget: bytes of Z (and per-chunk buffers) held at once.

    Returns:
        QualityTable; eta and gamma use the TEST refit risks. See the module docstring and
        SIGN_CONVENTIONS for the signs.
    """
    if task not in ("regression", "classification"):
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    K = len(train_xs)
    if K == 0:
        raise ValueError("train_xs must hold at least one modality tensor, got an empty list")
    if len(test_xs) != K:
        raise ValueError(f"test_xs has {len(test_xs)} modalities, expected {K} (as train_xs)")
    subs = [tuple(sorted(s)) for s in (all_subsets(K) if subsets is None else subsets)]
    if not subs:
        raise ValueError("subsets must not be empty")
    for s in subs:
        if not s or any(not 0 <= k < K for k in s):
            raise ValueError(f"subsets entry {s} must name modalities in 0..{K - 1}")
    if names is None:
        labels = modality_labels(K)
        names = [subset_name(s, labels) for s in subs]
    if len(names) != len(subs):
        raise ValueError(f"names has {len(names)} entries, expected {len(subs)} (one per subset)")
    if bayes_risk is not None and not math.isfinite(bayes_risk):
        raise ValueError(f"bayes_risk must be finite, got {bayes_risk}")
    by_name = dict(zip(names, range(len(subs)), strict=True))
    by_tuple = {s: i for i, s in enumerate(subs)}

    def lookup(key: str | Sequence[int], what: str) -> int:
        i = by_name.get(key) if isinstance(key, str) else by_tuple.get(tuple(sorted(key)))
        if i is None:
            raise ValueError(f"{what} names subset {key!r}, which is not among {list(names)}")
        return i

    train = _heads.encoded(encoder, train_xs, memory_budget=memory_budget)
    test = _heads.encoded(encoder, test_xs, memory_budget=memory_budget)
    S = train.shape()[0]
    if S != len(subs):
        raise ValueError(f"encoder returns S = {S} subsets, expected {len(subs)} (len(subsets))")
    if (task == "classification" and num_classes is None and train_y.numel()
            and test_y.numel() and not train_y.is_floating_point()
            and not test_y.is_floating_point()):
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    fitted = _heads.fit(train, train_y, task=task, l2=l2, class_weight=class_weight,
                        num_classes=num_classes)
    risk_tr, risk_te = fitted.risk(train, train_y), fitted.risk(test, test_y)
    if task == "classification":
        acc_tr, acc_te = fitted.accuracy(train, train_y), fitted.accuracy(test, test_y)
    else:
        acc_tr = acc_te = None

    if reference is None and bayes_risk is not None:
        ref_label, ref_risk = "Bayes risk (given)", float(bayes_risk)
    else:
        if reference is None:
            full = tuple(range(K))
            if full not in by_tuple:
                raise ValueError("no subset holds every modality and no bayes_risk was given; "
                                 "pass reference= (a subset) or bayes_risk=")
            ref = by_tuple[full]
        else:
            ref = lookup(reference, "reference")
        ref_label = f"refit test risk of subset {names[ref]} (an estimate; eta may be < 0)"
        ref_risk = float(risk_te[ref])

    table = QualityTable(task, ref_label, ref_risk)
    for i, s in enumerate(subs):
        table.rows.append({
            "subset": names[i],
            "modalities": " ".join(map(str, s)),
            "train_risk": float(risk_tr[i]),
            "test_risk": float(risk_te[i]),
            "train_accuracy": None if acc_tr is None else float(acc_tr[i]),
            "test_accuracy": None if acc_te is None else float(acc_te[i]),
            "eta": float(risk_te[i]) - ref_risk,
            "converged": bool(fitted.converged[i]),
        })
    wanted = [(m, n) for m in range(len(subs)) for n in range(len(subs))
              if m != n and subs[m] != subs[n] and is_subset(subs[m], subs[n])]
    for a, b in pairs or []:
        pair = (lookup(a, "pairs"), lookup(b, "pairs"))
        if pair not in wanted:
            wanted.append(pair)
    for m, n in wanted:
        table.pairs.append({
            "M": names[m],
            "N": names[n],
            "nested": is_subset(subs[m], subs[n]),
            "gamma_loss": float(risk_te[m] - risk_te[n]),
            "gamma_acc_points": None if acc_te is None else 100.0 * float(acc_te[m] - acc_te[n]),
        })
    return table
