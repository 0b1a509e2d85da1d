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

The head's l2 is chosen per subset by k-fold cross-validation on the training rows by default
(mmkernels.heads.fit_cv; every table says how l2 was chosen). Caveat, measured (see the
sweep-scaling section of BENCHMARKS.md): when the encoder was trained on those same rows and
has memorised them, their latents are easier to separate than fresh rows', so the folds'
held-out risk is far below the test risk and CV picks too small an l2; compare each row's
cv_risk with its test_risk. Rows the encoder never saw would be the unbiased choice.

Data flow: the encoder runs once over the training rows and once over the test rows (in
chunks within memory_budget); each subset's Z is kept at its own width (with blocks=, the
columns of its own modalities only; mmkernels.heads.GroupedZ), checked for NaN/Inf once, and
every solver iteration reads that Z, never the encoder.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
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
    converged, l2 (the head's), cv_risk (the cross-validated risk at that l2; None when l2
    was fixed). pairs keys: M, N, nested, gamma_loss (negative = M better),
    gamma_acc_points (positive = M better; None for regression). l2_choice: how l2 was chosen.
    """

    task: str
    reference: str
    reference_risk: float
    rows: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    l2_choice: str = ""

    def header(self) -> str:
        risk = "mean squared error" if self.task == "regression" else "mean cross-entropy (nats)"
        l2 = f" Head l2: {self.l2_choice}." if self.l2_choice else ""
        return (f"task: {self.task}; risk: {risk}; eta reference: {self.reference} = "
                f"{self.reference_risk:.6g}.{l2} {SIGN_CONVENTIONS}")

    def to_markdown(self) -> str:
        out = [self.header(), ""]
        out.append(_markdown(self.rows, ["subset", "train_risk", "test_risk", "train_accuracy",
                                         "test_accuracy", "eta", "converged", "l2",
                                         "cv_risk"]))
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
    return markdown_table(keys, [[f"{row[k]:.3g}" if k == "l2" and row[k] is not None
                                  else _fmt(row[k]) for k in keys] for row in data])


Modalities = Sequence[Tensor] | Mapping[str, Tensor]
Mask = Tensor | Mapping[str, Tensor] | None


def _modalities(xs: Modalities, what: str) -> tuple[list[str] | None, list[Tensor]]:
    """(names or None, tensors) of a list or dict of modality tensors."""
    if isinstance(xs, Mapping):
        return [str(k) for k in xs], list(xs.values())
    if not isinstance(xs, (list, tuple)):
        raise ValueError(f"{what} must be a list or a dict of modality tensors, got "
                         f"{type(xs).__name__}")
    return None, list(xs)


def _take(xs: Modalities, mask: Mask, order: Tensor) -> tuple[Modalities, Mask]:
    """xs and mask with their rows in ``order``."""
    if isinstance(xs, Mapping):
        xs = {k: v.index_select(0, order) for k, v in xs.items()}
    else:
        xs = [x.index_select(0, order) for x in xs]
    if isinstance(mask, Mapping):
        mask = {k: v.index_select(0, order) for k, v in mask.items()}
    elif mask is not None:
        mask = mask.index_select(0, order)
    return xs, mask


def _latent_blocks(encoder: Callable) -> list[int] | None:
    """The per-modality block widths of a late-fusion SubsetEnsemble's latents (when the
    encoder is its bound latents method), else None."""
    from mmkernels.nn import SubsetEnsemble

    owner = getattr(encoder, "__self__", None)
    if (isinstance(owner, SubsetEnsemble) and owner.fusion == "late"
            and getattr(encoder, "__func__", None) is SubsetEnsemble.latents):
        return list(owner.hidden)
    return None


def refit_quality(
    encoder: Callable[..., Tensor],
    train_xs: Modalities,
    train_y: Tensor,
    test_xs: Modalities,
    test_y: Tensor,
    *,
    task: str,
    train_mask: Mask = None,
    test_mask: Mask = None,
    subsets: Sequence[Sequence[int]] | None = None,
    names: Sequence[str] | None = None,
    reference: str | Sequence[int] | None = None,
    pairs: Sequence[tuple[str | Sequence[int], str | Sequence[int]]] | None = None,
    bayes_risk: float | None = None,
    l2: float | str | None = "cv",
    l2_grid: Sequence[float] | None = None,
    cv_folds: int = 5,
    blocks: Sequence[int] | None = None,
    class_weight: str | Tensor | None = None,
    num_classes: int | None = None,
    memory_budget: int = _heads.DEFAULT_MEMORY_BUDGET,
) -> QualityTable:
    """Refit heads on every subset's frozen encoder and tabulate eta and gamma.

    Args:
        encoder: maps modality tensors [r, d_k] (a list, or a dict when train_xs is one) to
            [S, r, L], row s being the representation of subsets[s] (e.g. a SubsetEnsemble's
            latents); called as encoder(xs) or, with a mask, encoder(xs, mask), on row chunks
            whose output fits memory_budget / 4, under torch.no_grad(), once per row.
        train_xs, train_y, test_xs, test_y: K modality tensors [n, d_k] (a list in modality
            order, or a dict name -> tensor, the dict's order being the modality order) and
            targets (float [n] / [n, T] for regression, int labels [n] for classification).
        task: "regression" or "classification".
        train_mask, test_mask: optional presence masks (bool [n, K], or a dict name -> bool
            [n]) passed to the encoder. Every row is refitted and scored: a subset sees, on a
            row, the modalities it holds that the row has (a SubsetEnsemble's absent blocks are
            zero: the paper's masking map), so all subsets are compared on the same rows.
        subsets: the modality tuple of each encoder output row; default all_subsets(K).
        names: a name per subset; default the modality labels (A, B, C, ... or the names'
            initials) per modality ("AC").
        reference: None (Bayes risk when given, else the subset holding every modality), or a
            subset (tuple or name) whose refit test risk is the eta reference.
        pairs: extra (M, N) pairs for gamma, by tuple or name; every strictly nested pair
            M subset of N is always included.
        bayes_risk: the Bayes risk in the task's risk units, when known.
        l2: "cv" (default): chosen per subset by cv_folds-fold cross-validation on the
            training rows over l2_grid (mmkernels.heads.fit_cv: stratified folds for
            classification, the mean held-out risk); a float: that l2 for every subset; None:
            mmkernels.heads.fit's default.
        l2_grid: the l2 values cross-validated (default: heads.select_l2's).
        cv_folds: folds of the cross-validation (at most the number of training rows).
        blocks: widths of the encoder output's per-modality blocks (late fusion: [H_1..H_K]);
            subset s's Z is then the concatenation of its own modalities' blocks (m * H wide
            for m modalities of width H), the other blocks being zero (checked). Default: the
            model's hidden widths when encoder is a late-fusion SubsetEnsemble's latents
            method, else none (every column is kept).
        class_weight, num_classes: passed to mmkernels.heads.fit; for classification
            num_classes defaults to 1 + the largest label of train_y AND test_y, so a class
            seen only in the test set gets a head column (never fitted to, so it is scored as
            unlikely) instead of an error.
        memory_budget: bytes of Z held in memory (Z larger than that goes to a memory-mapped
            temporary file; see mmkernels.heads.GroupedZ.from_source).

    Returns:
        QualityTable; eta and gamma use the TEST refit risks. See the module docstring and
        SIGN_CONVENTIONS for the signs.
    """
    if task not in ("regression", "classification"):
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
    mod_names, train_list = _modalities(train_xs, "train_xs")
    test_names, test_list = _modalities(test_xs, "test_xs")
    K = len(train_list)
    if K == 0:
        raise ValueError("train_xs must hold at least one modality tensor, got an empty list")
    if len(test_list) != K:
        raise ValueError(f"test_xs has {len(test_list)} modalities, expected {K} (as train_xs)")
    if test_names != mod_names:
        raise ValueError(f"test_xs must name the modalities of train_xs, {mod_names}, got "
                         f"{test_names}")
    for what, tensors, y in (("train", train_list, train_y), ("test", test_list, test_y)):
        rows = {int(x.shape[0]) for x in tensors if isinstance(x, Tensor)}
        if isinstance(y, Tensor) and len(rows) == 1 and int(y.shape[0]) not in rows:
            raise ValueError(f"{what}_y has {int(y.shape[0])} rows, expected {rows.pop()} (the "
                             f"rows of {what}_xs)")
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget}")
    subs = [tuple(sorted(s)) for s in (all_subsets(K) if subsets is None else subsets)]
    if not subs:
        raise ValueError("subsets must not be empty")
    for s in subs:
        if not s or any(not 0 <= k < K for k in s):
            raise ValueError(f"subsets entry {s} must name modalities in 0..{K - 1}")
    if names is None:
        labels = modality_labels(mod_names if mod_names is not None else K)
        names = [subset_name(s, labels) for s in subs]
    if len(names) != len(subs):
        raise ValueError(f"names has {len(names)} entries, expected {len(subs)} (one per subset)")
    if bayes_risk is not None and not math.isfinite(bayes_risk):
        raise ValueError(f"bayes_risk must be finite, got {bayes_risk}")
    if isinstance(l2, str) and l2 != "cv":
        raise ValueError(f"l2 must be 'cv', a float >= 0 or None, got {l2!r}")
    by_name = dict(zip(names, range(len(subs)), strict=True))
    by_tuple = {s: i for i, s in enumerate(subs)}

    def lookup(key: str | Sequence[int], what: str) -> int:
        i = by_name.get(key) if isinstance(key, str) else by_tuple.get(tuple(sorted(key)))
        if i is None:
            raise ValueError(f"{what} names subset {key!r}, which is not among {list(names)}")
        return i

    blocks = _latent_blocks(encoder) if blocks is None else list(blocks)
    columns = None
    if blocks is not None:
        if len(blocks) != K or any(int(b) < 1 for b in blocks):
            raise ValueError(f"blocks must give {K} block widths >= 1 (one per modality), got "
                             f"{blocks}")
        offsets = [0]
        for b in blocks:
            offsets.append(offsets[-1] + int(b))
        columns = [torch.cat([torch.arange(offsets[k], offsets[k + 1]) for k in s])
                   for s in subs]

    cv = l2 == "cv"
    folds = None
    if cv:
        n_train = int(train_y.shape[0])
        F = min(int(cv_folds), n_train)
        if F < 2:
            raise ValueError(f"l2='cv' needs at least 2 training rows and cv_folds >= 2, got "
                             f"{n_train} rows and cv_folds = {cv_folds}; pass l2=VALUE")
        labels_ok = task == "classification" and not train_y.is_floating_point()
        fold = _heads.kfold(train_y, F, stratify=labels_ok)
        # Rows sorted by fold, so every fold is a contiguous block the solver reads in place.
        order = torch.argsort(fold, stable=True)
        train_xs, train_mask = _take(train_xs, train_mask, order)
        train_y, folds = train_y.index_select(0, order), fold.index_select(0, order)

    def grouped(xs: Modalities, mask: Mask) -> _heads.GroupedZ:
        src = _heads.encoded(encoder, xs, mask=mask, memory_budget=memory_budget)
        return _heads.GroupedZ.from_source(src, columns, memory_budget=memory_budget)

    train = grouped(train_xs, train_mask)
    test = grouped(test_xs, test_mask)
    S = train.num_subsets
    if S != len(subs):
        raise ValueError(f"encoder returns S = {S} subsets, expected {len(subs)} (len(subsets))")
    if (task == "classification" and num_classes is None and train_y.numel()
            and test_y.numel() and not train_y.is_floating_point()
            and not test_y.is_floating_point()):
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    cv_risk = None
    if cv:
        fitted, search = _heads.fit_cv(train, train_y, task=task, grid=l2_grid, folds=folds,
                                       class_weight=class_weight, num_classes=num_classes)
        cv_risk = search.score.gather(1, search.score.nan_to_num(math.inf).argmin(1,
                                                                               keepdim=True))
        grid = sorted({round(float(v), 12) for v in search.grid.flatten().tolist()})
        grid_text = (f"{len(search.grid[0])} values per subset, relative to its Gram"
                     if l2_grid is None and task == "regression"
                     else ", ".join(f"{v:.3g}" for v in grid))
        l2_choice = (f"chosen per subset by {search.num_folds}-fold cross-validation on the "
                     f"training rows (mean held-out risk) over {grid_text}")
    else:
        fitted = _heads.fit(train, train_y, task=task, l2=l2, class_weight=class_weight,
                            num_classes=num_classes)
        l2_choice = (f"fixed, {float(l2):.3g} for every subset" if l2 is not None else
                     "mmkernels.heads.fit's default (1.0 for classification; ridge: 1e-6 "
                     "trace(centred Gram) / H)")
    risk_tr, risk_te = fitted.risk(train, train_y), fitted.risk(test, test_y)
    if task == "classification":
        acc_tr, acc_te = fitted.accuracy(train, train_y), fitted.accuracy(test, test_y)
    else:
        acc_tr = acc_te = None
    l2_used = fitted.l2

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

    table = QualityTable(task, ref_label, ref_risk, l2_choice=l2_choice)
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
            "l2": float(l2_used[i]),
            "cv_risk": None if cv_risk is None else float(cv_risk[i]),
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
