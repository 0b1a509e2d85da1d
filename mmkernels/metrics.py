"""Test metrics of every subset model at once: predictions ``[S, n]`` against one target ``[n]``.

Every function takes predictions with any leading batch shape (typically ``[S]``, one row per
subset; ``[n]`` alone is one model) and the targets shared by all of them, and returns one
float64 value per leading index. Everything is computed in float64 (counts in int64), on the
predictions' device, with torch only.

Classification (predicted labels, e.g. ``logits.argmax(-1)``; ``C`` classes; for class c,
tp_c = rows of class c predicted c, fp_c = rows of another class predicted c, fn_c = rows of
class c predicted otherwise, support_c = tp_c + fn_c, the rows of class c):

* ``accuracy``: sum_c tp_c / n, the fraction of rows predicted right. The speech-emotion
  literature on IEMOCAP calls it **weighted accuracy** (WA, also weighted average recall, WAR):
  it equals the per-class recalls weighted by the class frequencies, sum_c (support_c / n)
  recall_c. Equal to scikit-learn's ``accuracy_score``.
* ``unweighted_accuracy``: the mean of recall_c = tp_c / support_c over the classes present in
  the target (support_c > 0). The same literature's **unweighted accuracy** (UA, UAR): every
  class counts the same, so ignoring a rare class costs 1/C of it. It is scikit-learn's
  ``balanced_accuracy_score`` (adjusted=False). Note: the multimodal-sentiment literature
  (CMU-MOSI/MOSEI, binary per-emotion IEMOCAP tasks, after Tong et al. 2017) also says
  "weighted accuracy" for (TP N/P + TN) / 2N, i.e. (recall_1 + recall_0) / 2: that is THIS
  quantity for two classes, not ``accuracy``. Say which one a table shows.
* ``f1`` with ``average="macro"``: the mean of F1_c = 2 tp_c / (2 tp_c + fp_c + fn_c) over the
  classes that occur in the target or in the predictions (per model: the set differs between
  subsets). A class of the target that is never predicted has F1_c = 0, and so has a predicted
  class absent from the target. Equal to scikit-learn's ``f1_score(average="macro")``, whose
  labels default to the union of the true and predicted labels.
* ``f1`` with ``average="weighted"``: sum_c support_c F1_c / n, the F1 weighted by the true
  class frequencies (a class absent from the target weighs 0). scikit-learn's
  ``average="weighted"``.

Regression (predictions ``[..., n]`` against a target ``[n]``, or ``[..., n, T]`` against
``[n, T]`` for T outputs; each output is scored alone, then the T scores are averaged, like
scikit-learn's ``multioutput="uniform_average"``):

* ``mean_squared_error``: mean of (pred - target)^2.
* ``mean_absolute_error``: mean of |pred - target| (scikit-learn's ``mean_absolute_error``).
* ``pearson``: Pearson's correlation over the rows, r = sum dp dt / sqrt(sum dp^2 sum dt^2)
  with dp = pred - mean(pred), dt = target - mean(target), clipped to [-1, 1] (rounding).
  It is undefined, and returned as NaN, when the predictions or the target are constant
  over the rows (for any output, with T > 1), tested exactly, as scipy's ``pearsonr`` does
  (numpy's ``corrcoef`` may return a rounding artefact there). Needs n >= 2.

:func:`classification_metrics` and :func:`regression_metrics` return all of a task's metrics
from one pass (one confusion matrix per model) as a dict of tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "accuracy", "unweighted_accuracy", "f1",
           "classification_metrics", "mean_squared_error", "mean_absolute_error", "pearson",
           "regression_metrics"]


def _shape(t: Tensor) -> str:
    return f"{t.dtype} {list(t.shape)}"


def _check_labels(pred: Tensor, target: Tensor, num_classes: int | None) -> int:
    """Validate class labels; returns the number of classes C."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name}: expected integer class labels, got {_shape(t)} (take "
                             "logits.argmax(-1) of a model's outputs)")
    if target.dim() != 1:
        raise ValueError(f"target: expected one label per row, shape [n], got {_shape(target)}")
    if pred.dim() < 1 or pred.shape[-1] != target.shape[0]:
        raise ValueError(f"pred: expected shape [..., n] with n = {target.shape[0]} (the "
                         f"target's rows), got {_shape(pred)}")
    if target.shape[0] == 0:
        raise ValueError("target: expected at least one row, got n = 0")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on one device, got {pred.device} and "
                         f"{target.device}")
    lo = min(int(pred.min()), int(target.min())) if pred.numel() else int(target.min())
    if lo < 0:
        raise ValueError(f"pred / target: class labels must be >= 0, got {lo}")
    hi = max(int(pred.max()), int(target.max())) if pred.numel() else int(target.max())
    if num_classes is None:
        return hi + 1
    if num_classes < 1 or hi >= num_classes:
        raise ValueError(f"num_classes: expected more than the largest label {hi}, got "
                         f"{num_classes}")
    return int(num_classes)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int | None = None) -> Tensor:
    """Counts ``[..., C, C]`` (int64): entry [..., i, j] is the number of rows of true class i
    predicted as j, one matrix per leading index of ``pred`` ``[..., n]``; ``target`` ``[n]``.
    C is ``num_classes``, default 1 + the largest label seen."""
    c = _check_labels(pred, target, num_classes)
    lead = pred.shape[:-1]
    flat = pred.reshape(-1, target.shape[0]).long()
    m = flat.shape[0]
    model = torch.arange(m, device=pred.device).view(-1, 1)
    cell = (model * c + target.long().view(1, -1)) * c + flat
    counts = torch.bincount(cell.reshape(-1), minlength=m * c * c)
    return counts.view(*lead, c, c)


def _per_class(cm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(tp, support, predicted) per class, float64 [..., C], from confusion matrices."""
    cm = cm.double()
    return torch.diagonal(cm, dim1=-2, dim2=-1), cm.sum(-1), cm.sum(-2)


def _accuracy(cm: Tensor) -> Tensor:
    tp, support, _ = _per_class(cm)
    return tp.sum(-1) / support.sum(-1)


def _unweighted_accuracy(cm: Tensor) -> Tensor:
    tp, support, _ = _per_class(cm)
    present = support > 0
    recall = torch.where(present, tp / support.clamp(min=1), torch.zeros_like(tp))
    return recall.sum(-1) / present.sum(-1)


def _f1(cm: Tensor, average: str) -> Tensor:
    tp, support, predicted = _per_class(cm)
    denom = support + predicted  # = 2 tp + fp + fn
    seen = denom > 0
    f1c = torch.where(seen, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    if average == "macro":
        return f1c.sum(-1) / seen.sum(-1)
    return (f1c * support).sum(-1) / support.sum(-1)


def accuracy(pred: Tensor, target: Tensor) -> Tensor:
    """Fraction of rows predicted right (IEMOCAP's weighted accuracy, WA), ``[...]``."""
    return _accuracy(confusion_matrix(pred, target))


def unweighted_accuracy(pred: Tensor, target: Tensor, num_classes: int | None = None) -> Tensor:
    """Mean recall over the classes present in the target (UA, balanced accuracy), ``[...]``."""
    return _unweighted_accuracy(confusion_matrix(pred, target, num_classes))


def f1(pred: Tensor, target: Tensor, *, average: str = "macro",
       num_classes: int | None = None) -> Tensor:
    """F1 score, ``average`` "macro" (mean over the classes seen in target or predictions) or
    "weighted" (weighted by the true class counts); see the module docstring. ``[...]``."""
    if average not in ("macro", "weighted"):
        raise ValueError(f'average: expected "macro" or "weighted", got {average!r}')
    return _f1(confusion_matrix(pred, target, num_classes), average)


def classification_metrics(pred: Tensor, target: Tensor,
                           num_classes: int | None = None) -> dict[str, Tensor]:
    """All classification metrics from one confusion matrix per model: "accuracy" (WA),
    "unweighted_accuracy" (UA), "f1_macro", "f1_weighted", each float64 ``[...]``."""
    cm = confusion_matrix(pred, target, num_classes)
    return {"accuracy": _accuracy(cm), "unweighted_accuracy": _unweighted_accuracy(cm),
            "f1_macro": _f1(cm, "macro"), "f1_weighted": _f1(cm, "weighted")}


def _check_regression(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """float64 (pred [..., n, T], target [n, T]) after validating the shapes."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name}: expected real numbers, got {_shape(t)}")
    if target.dim() not in (1, 2):
        raise ValueError(f"target: expected shape [n] or [n, T], got {_shape(target)}")
    tail = tuple(target.shape)
    if pred.dim() < target.dim() or tuple(pred.shape[pred.dim() - target.dim():]) != tail:
        want = "[..., n]" if target.dim() == 1 else "[..., n, T]"
        raise ValueError(f"pred: expected shape {want} ending in {list(tail)} (the target's), "
                         f"got {_shape(pred)}")
    if target.shape[0] == 0:
        raise ValueError("target: expected at least one row, got n = 0")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on one device, got {pred.device} and "
                         f"{target.device}")
    if target.dim() == 1:
        pred, target = pred.unsqueeze(-1), target.unsqueeze(-1)
    return pred.double(), target.double()


def mean_squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of (pred - target)^2 over rows (and outputs), ``[...]``."""
    p, t = _check_regression(pred, target)
    return ((p - t) ** 2).mean(dim=(-2, -1))


def mean_absolute_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of |pred - target| over rows (and outputs), ``[...]``."""
    p, t = _check_regression(pred, target)
    return (p - t).abs().mean(dim=(-2, -1))


def pearson(pred: Tensor, target: Tensor) -> Tensor:
    """Pearson's r over the rows (averaged over outputs), ``[...]``; NaN where the
    predictions or the target are constant (undefined)."""
    p, t = _check_regression(pred, target)
    if t.shape[0] < 2:
        raise ValueError(f"target: Pearson's r needs at least 2 rows, got {t.shape[0]}")
    # Constancy is tested exactly on the inputs: centring in floating point leaves rounding
    # residue on constant columns, which would give an arbitrary r instead of NaN.
    flat = (p == p[..., :1, :]).all(dim=-2) | (t == t[:1]).all(dim=0)
    dp, dt = p - p.mean(dim=-2, keepdim=True), t - t.mean(dim=0, keepdim=True)
    r = (dp * dt).sum(-2) / torch.sqrt((dp * dp).sum(-2) * (dt * dt).sum(0))
    r = torch.where(flat, torch.full_like(r, float("nan")), r.clamp(-1.0, 1.0))
    return r.mean(-1)


def regression_metrics(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """"mse", "mae" and "pearson" (NaN when undefined, or with a single row), float64
    ``[...]``."""
    out = {"mse": mean_squared_error(pred, target), "mae": mean_absolute_error(pred, target)}
    if target.shape[0] < 2:
        out["pearson"] = torch.full_like(out["mae"], float("nan"))
    else:
        out["pearson"] = pearson(pred, target)
    return out
