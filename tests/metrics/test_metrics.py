"""mmkernels.metrics against scikit-learn, numpy and scipy, batched over subsets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr
from sklearn import metrics as skm

from mmkernels import metrics


def sklearn_classification(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected
        warnings.simplefilter("ignore")
        return {
            "accuracy": skm.accuracy_score(target, pred),
            "unweighted_accuracy": skm.balanced_accuracy_score(target, pred),
            "f1_macro": skm.f1_score(target, pred, average="macro", zero_division=0),
            "f1_weighted": skm.f1_score(target, pred, average="weighted", zero_division=0),
        }


def assert_classification_matches(pred: torch.Tensor, target: torch.Tensor) -> None:
    ours = metrics.classification_metrics(pred, target)
    flat = pred.reshape(-1, target.shape[0]).numpy()
    for key, value in ours.items():
        assert value.dtype == torch.float64 and value.shape == pred.shape[:-1], key
        want = [sklearn_classification(row, target.numpy())[key] for row in flat]
        np.testing.assert_allclose(value.reshape(-1).numpy(), want, rtol=1e-12, atol=1e-15,
                                   err_msg=key)


@settings(max_examples=50, deadline=None)
@given(s=st.integers(1, 4), n=st.integers(1, 40), c=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_classification_matches_sklearn_on_random_labels(s, n, c, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    # Fewer predicted classes than true ones for some subsets: classes never predicted.
    pred = torch.randint(0, c, (s, n), generator=g) % torch.randint(1, c + 1, (s, 1),
                                                                   generator=g)
    assert_classification_matches(pred, target)


def test_classification_degenerate_cases() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    pred = torch.stack([
        target,                               # perfect
        torch.zeros(8, dtype=torch.long),     # constant: classes 1, 2, 3 never predicted
        torch.full((8,), 4),                  # a class absent from the target, always
        torch.tensor([1, 1, 0, 0, 3, 3, 3, 2]),  # everything wrong
        torch.tensor([0, 0, 1, 1, 2, 2, 2, 2]),  # class 3 never predicted
    ])
    assert_classification_matches(pred, target)
    got = metrics.classification_metrics(pred, target)
    assert got["accuracy"][0] == 1 and got["f1_macro"][0] == 1
    assert got["unweighted_accuracy"][1] == pytest.approx(0.25)  # recall 1, 0, 0, 0
    assert got["f1_macro"][2] == 0 and got["unweighted_accuracy"][2] == 0
    one_class = torch.zeros(5, dtype=torch.long)  # a target of a single class
    assert_classification_matches(torch.stack([one_class, one_class + 1]), one_class)
    assert_classification_matches(torch.tensor([2]), torch.tensor([2]))  # n = 1


def test_weighted_accuracy_is_the_frequency_weighted_recall() -> None:
    # The IEMOCAP literature's WA: per-class recall weighted by class frequency = accuracy.
    g = torch.Generator().manual_seed(3)
    target, pred = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (3, 200),
                                                                            generator=g)
    cm = metrics.confusion_matrix(pred, target, 4).double()
    recall = torch.diagonal(cm, dim1=-2, dim2=-1) / cm.sum(-1)
    freq = torch.bincount(target, minlength=4).double() / 200
    torch.testing.assert_close(metrics.accuracy(pred, target), (recall * freq).sum(-1))
    torch.testing.assert_close(metrics.unweighted_accuracy(pred, target), recall.mean(-1))


def test_confusion_matrix_and_leading_dims() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (30,), generator=g)
    pred = torch.randint(0, 5, (2, 3, 30), generator=g)
    cm = metrics.confusion_matrix(pred, target, num_classes=5)
    assert cm.shape == (2, 3, 5, 5) and cm.dtype == torch.int64
    for i in range(2):
        for j in range(3):
            want = skm.confusion_matrix(target.numpy(), pred[i, j].numpy(), labels=range(5))
            np.testing.assert_array_equal(cm[i, j].numpy(), want)
    assert_classification_matches(pred, target)
    # One model without a batch axis.
    assert metrics.accuracy(pred[0, 0], target).shape == ()
    assert metrics.f1(pred[0], target, average="weighted").shape == (3,)


def test_num_classes_does_not_change_the_scores() -> None:
    # Extra classes absent from target and predictions are not averaged over.
    target, pred = torch.tensor([0, 1, 1, 2]), torch.tensor([[0, 1, 2, 2]])
    base = metrics.classification_metrics(pred, target)
    wide = metrics.classification_metrics(pred, target, num_classes=10)
    for key in base:
        torch.testing.assert_close(base[key], wide[key])


def sklearn_regression(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    # float64 references on the same values (scipy would compute float32 in float32)
    t2 = target.reshape(target.shape[0], -1).astype(np.float64)
    p2 = pred.reshape(t2.shape).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's ConstantInputWarning: r is NaN there
        r = [pearsonr(p2[:, j], t2[:, j]).statistic for j in range(t2.shape[1])]
        r_np = [np.corrcoef(p2[:, j], t2[:, j])[0, 1] for j in range(t2.shape[1])]
    # The two references agree where r is defined (numpy's corrcoef does not test for
    # constant input: there it returns NaN or, after rounding, an arbitrary value).
    ok = np.isfinite(r)
    np.testing.assert_allclose(np.asarray(r)[ok], np.asarray(r_np)[ok], rtol=1e-9, atol=1e-12)
    return {"mse": skm.mean_squared_error(t2, p2), "mae": skm.mean_absolute_error(t2, p2),
            "pearson": float(np.mean(r))}


def assert_regression_matches(pred: torch.Tensor, target: torch.Tensor) -> None:
    ours = metrics.regression_metrics(pred, target)
    lead = pred.shape[: pred.dim() - target.dim()]
    flat = pred.reshape(-1, *target.shape).numpy()
    for key, value in ours.items():
        assert value.dtype == torch.float64 and value.shape == lead, key
        want = [sklearn_regression(row, target.numpy())[key] for row in flat]
        np.testing.assert_allclose(value.reshape(-1).numpy(), want, rtol=1e-10, atol=1e-12,
                                   err_msg=key)


@settings(max_examples=50, deadline=None)
@given(s=st.integers(1, 5), n=st.integers(2, 40), t=st.sampled_from([None, 1, 3]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31))
def test_regression_matches_sklearn_and_scipy(s, n, t, dtype, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if t is None else (n, t)
    target = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    pred = (0.5 * target + torch.randn((s, *shape), generator=g, dtype=torch.float64)).to(dtype)
    assert_regression_matches(pred, target)


def test_regression_degenerate_cases() -> None:
    target = torch.tensor([1.0, 2.0, 4.0, 8.0])
    pred = torch.stack([
        target.clone(),                   # perfect: r = 1
        torch.full((4,), 3.7),            # constant predictions: r undefined
        -2 * target + 1,                  # r = -1
        torch.full((4,), 0.1 + 0.2),      # constant, not exactly representable
    ]).float()
    assert_regression_matches(pred, target.float())
    r = metrics.pearson(pred, target.float())
    assert r[0] == 1 and r[2] == -1 and torch.isnan(r[1]) and torch.isnan(r[3])
    # Constant in float64, where centring leaves a rounding residue (mean(3.7, 3.7, 3.7)
    # != 3.7): still undefined, not an arbitrary r.
    const = torch.full((1, 3), 3.7, dtype=torch.float64)
    t3 = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert (const - const.mean()).abs().max() > 0
    assert_regression_matches(const, t3)
    assert torch.isnan(metrics.pearson(const, t3)).all()
    # A constant target: every r is NaN; the errors are still defined.
    flat = metrics.regression_metrics(pred, torch.full((4,), 2.0))
    assert torch.isnan(flat["pearson"]).all() and torch.isfinite(flat["mae"]).all()
    # One output constant out of two: the averaged r is NaN (undefined), as its part.
    two = torch.stack([target, target], dim=1)
    p2 = torch.stack([target, torch.ones(4, dtype=torch.float64)], dim=1)
    assert torch.isnan(metrics.pearson(p2.unsqueeze(0), two)).all()
    # A single row: errors defined, r NaN.
    one = metrics.regression_metrics(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0]))
    torch.testing.assert_close(one["mae"], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.isnan(one["pearson"]).all()


def test_bad_arguments_are_named() -> None:
    y = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="pred: expected integer class labels"):
        metrics.accuracy(torch.zeros(2, 3), y)
    with pytest.raises(ValueError, match=r"pred: expected shape \[..., n\] with n = 3"):
        metrics.accuracy(torch.zeros(2, 4, dtype=torch.long), y)
    with pytest.raises(ValueError, match="target: expected one label per row"):
        metrics.accuracy(torch.zeros(2, 3, dtype=torch.long), y.view(1, 3))
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        metrics.accuracy(torch.tensor([0, -1, 1]), y)
    with pytest.raises(ValueError, match="num_classes: expected more than the largest label 1"):
        metrics.classification_metrics(torch.tensor([0, 1, 1]), y, num_classes=2 - 1)
    with pytest.raises(ValueError, match="at least one row"):
        metrics.accuracy(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match='average: expected "macro" or "weighted"'):
        metrics.f1(y, y, average="micro")
    with pytest.raises(TypeError, match="pred: expected a torch.Tensor, got list"):
        metrics.accuracy([0, 1, 1], y)
    yr = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"pred: expected shape \[..., n, T\] ending in \[5, 2\]"):
        metrics.mean_absolute_error(torch.randn(3, 5), yr)
    with pytest.raises(ValueError, match="target: expected shape"):
        metrics.mean_absolute_error(torch.randn(3, 5, 2, 1), torch.randn(5, 2, 1))
    with pytest.raises(ValueError, match="Pearson's r needs at least 2 rows"):
        metrics.pearson(torch.randn(3, 1), torch.randn(1))
