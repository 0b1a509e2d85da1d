"""Train every subset model of a :class:`~mmkernels.nn.SubsetEnsemble` at once.

    fit(model, xs, y, *, mask=None, task="classification", epochs=10, batch_size=2048,
        lr=0.01, weight_decay=0.0, seed=0, val_fraction=0.0, val_data=None, patience=None,
        clip_norm=None, restore_best=True, progress=True) -> FitResult
    evaluate(model, xs, y, *, mask=None, task="classification", batch_size=8192)
        -> {"loss": [S], "acc": [S]}
    epoch_batches(n, batch_size, generator) -> list of index tensors (one epoch's batch order)

The model contract: ``model(xs, mask) -> [S, B, C]`` and every parameter has the subset axis
first ([S, ...]); SubsetEnsemble satisfies it. The optimiser is Adam (torch.optim.Adam,
L2 ``weight_decay``), which is exact per subset (see SubsetEnsemble's docstring).

Determinism: the data are split and shuffled with a torch.Generator seeded by ``seed`` (the
model's initialisation has its own seed), so on CPU two calls with equal arguments give
bitwise-equal parameters and histories.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mmkernels.nn import SubsetEnsemble, clip_grad_norm_per_subset

__all__ = ["FitResult", "fit", "evaluate", "epoch_batches", "split_validation"]


@dataclass
class FitResult:
    """What :func:`fit` returns.

    history: name -> float64 tensor [epochs_run, S]; names "train_loss", "val_loss" and, for
        classification, "train_acc", "val_acc" (val_* only with validation data). Train
        metrics are averaged over the epoch's batches as they were trained (weighted by batch
        size), before each step; entries of a subset after it stopped are NaN.
    best_epoch: [S] epoch (0-based) of each subset's lowest validation loss; -1 without
        validation data.
    stopped_epoch: [S] epoch after which each subset stopped early; -1 if it never stopped.
    epochs_run: epochs actually run (fewer than asked when every subset stopped).
    subset_names: the model's subset names when it has them.
    """

    history: dict[str, Tensor]
    best_epoch: Tensor
    stopped_epoch: Tensor
    epochs_run: int
    subset_names: list[str] = field(default_factory=list)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch's batches: a permutation of range(n) from generator, cut into batch_size
    pieces (the last may be smaller)."""
    perm = torch.randperm(n, generator=generator)
    return list(perm.split(batch_size))


def split_validation(
    n: int, fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random (train_idx, val_idx) with round(fraction * n) validation rows (at least 1)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise ValueError(f"val_fraction={fraction} leaves no training rows out of {n}")
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class _NoBar:
    """What fit needs of a tqdm bar, doing nothing."""

    def __init__(self, epochs: int) -> None:
        self._epochs = range(epochs)

    def __iter__(self):
        return iter(self._epochs)

    def set_postfix(self, **_: object) -> None:
        pass

    def close(self) -> None:
        pass


def _epoch_bar(epochs: int, progress: bool):
    """A tqdm bar over the epochs, or a silent stand-in without progress or without tqdm."""
    if not progress:
        return _NoBar(epochs)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(epochs)
    return tqdm(range(epochs), desc="fit", unit="epoch", leave=False)


def _take(xs: Sequence[Tensor], y: Tensor, mask: Tensor | None, idx: Tensor, device):
    xb = [x[idx].to(device) for x in xs]
    return xb, y[idx].to(device), None if mask is None else mask[idx].to(device)


def _metrics(out: Tensor, y: Tensor, task: str) -> tuple[Tensor, Tensor | None]:
    loss = SubsetEnsemble.losses(out, y, task).detach()
    acc = (out.argmax(dim=2) == y.view(1, -1)).double().mean(dim=1) if task == "classification" \
        else None
    return loss, acc


@torch.no_grad()
def evaluate(
    model: nn.Module, xs: Sequence[Tensor], y: Tensor, *, mask: Tensor | None = None,
    task: str = "classification", batch_size: int = 8192,
) -> dict[str, Tensor]:
    """Per-subset mean loss ("loss", [S]) and, for classification, accuracy ("acc", [S]),
    computed in eval mode without gradients, in batches of rows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = y.shape[0]
    loss_sum: Tensor | None = None
    acc_sum: Tensor | None = None
    try:
        for lo in range(0, n, batch_size):
            idx = torch.arange(lo, min(n, lo + batch_size))
            xb, yb, mb = _take(xs, y, mask, idx, device)
            loss, acc = _metrics(model(xb, mb), yb, task)
            w = float(idx.numel())
            loss_sum = loss.double() * w if loss_sum is None else loss_sum + loss.double() * w
            if acc is not None:
                acc_sum = acc * w if acc_sum is None else acc_sum + acc * w
    finally:
        model.train(was_training)
    if loss_sum is None:
        raise ValueError("evaluate needs at least one row")
    out = {"loss": (loss_sum / n).cpu()}
    if acc_sum is not None:
        out["acc"] = (acc_sum / n).cpu()
    return out


def fit(
    model: nn.Module,
    xs: Sequence[Tensor],
    y: Tensor,
    *,
    mask: Tensor | None = None,
    task: str = "classification",
    epochs: int = 10,
    batch_size: int = 2048,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    seed: int = 0,
    val_fraction: float = 0.0,
    val_data: tuple[Sequence[Tensor], Tensor] | tuple[Sequence[Tensor], Tensor, Tensor | None]
    | None = None,
    patience: int | None = None,
    clip_norm: float | None = None,
    restore_best: bool = True,
    progress: bool = True,
) -> FitResult:
    """Train all subset models with Adam on the summed per-subset loss.

    Args:
        model: a SubsetEnsemble (or a module with its contract, see the module docstring).
        xs: K modality tensors [n, d_k]; y: labels, long [n] (classification) or float [n] /
            [n, C] (regression); mask: optional bool [n, K] presence.
        task: "classification" (cross-entropy, accuracy) or "regression" (MSE).
        epochs, batch_size, lr, weight_decay: Adam's settings (weight_decay is L2, per element).
        seed: seeds the validation split and the batch order (torch.Generator).
        val_fraction: hold out this fraction of (xs, y) for validation, chosen at random;
            ignored when val_data = (xs_val, y_val[, mask_val]) is given.
        patience: per-subset early stopping on the validation loss: a subset whose validation
            loss has not improved for ``patience`` consecutive epochs stops; it gets its best
            parameters back and its slice is restored after every later step, so it no longer
            changes (exactly a separate model that stopped). Training ends when all stopped.
        clip_norm: per-subset gradient-norm clipping (clip_grad_norm_per_subset).
        restore_best: with validation data, end with every subset at its best epoch.
        progress: show a tqdm bar over epochs (when tqdm is installed: it comes with the
            [experiments] extra; the library does not need it).

    Returns:
        FitResult with the per-subset history [epochs_run, S], best and stopping epochs.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f'task must be "classification" or "regression", got "{task}"')
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    xs = list(xs)
    n = y.shape[0]
    if any(x.shape[0] != n for x in xs) or (mask is not None and mask.shape[0] != n):
        raise ValueError("xs, y and mask must have the same number of rows")
    gen = torch.Generator().manual_seed(int(seed))
    val: tuple[list[Tensor], Tensor, Tensor | None] | None = None
    if val_data is not None:
        val = (list(val_data[0]), val_data[1], val_data[2] if len(val_data) > 2 else None)
    elif val_fraction > 0:
        tr, va = split_validation(n, val_fraction, gen)
        val = ([x[va] for x in xs], y[va], None if mask is None else mask[va])
        xs, y, mask = [x[tr] for x in xs], y[tr], None if mask is None else mask[tr]
        n = y.shape[0]
    if patience is not None and val is None:
        raise ValueError("patience needs validation data: give val_fraction or val_data")

    params = list(model.parameters())
    s_count = params[0].shape[0]
    device = params[0].device
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=False)
    frozen = torch.zeros(s_count, dtype=torch.bool)
    best = [p.detach().clone() for p in params]
    best_loss = torch.full((s_count,), float("inf"), dtype=torch.float64)
    best_epoch = torch.full((s_count,), -1, dtype=torch.long)
    stopped_epoch = torch.full((s_count,), -1, dtype=torch.long)
    bad = torch.zeros(s_count, dtype=torch.long)
    keys = ["train_loss"] + (["train_acc"] if task == "classification" else [])
    if val is not None:
        keys += ["val_loss"] + (["val_acc"] if task == "classification" else [])
    rows: dict[str, list[Tensor]] = {k: [] for k in keys}

    bar = _epoch_bar(epochs, progress)
    epochs_run = 0
    model.train()
    for epoch in bar:
        loss_sum = torch.zeros(s_count, dtype=torch.float64)
        acc_sum = torch.zeros(s_count, dtype=torch.float64)
        for idx in epoch_batches(n, batch_size, gen):
            xb, yb, mb = _take(xs, y, mask, idx, device)
            out = model(xb, mb)
            losses = SubsetEnsemble.losses(out, yb, task)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            if clip_norm is not None:
                clip_grad_norm_per_subset(model, clip_norm)
            opt.step()
            if bool(frozen.any()):
                fz = frozen.to(device)
                with torch.no_grad():
                    for p, b in zip(params, best, strict=True):
                        p[fz] = b[fz]
            with torch.no_grad():
                loss, acc = _metrics(out, yb, task)
                loss_sum += loss.double().cpu() * idx.numel()
                if acc is not None:
                    acc_sum += acc.cpu() * idx.numel()
        nan = torch.full((s_count,), float("nan"), dtype=torch.float64)
        rows["train_loss"].append(torch.where(frozen, nan, loss_sum / n))
        if task == "classification":
            rows["train_acc"].append(torch.where(frozen, nan, acc_sum / n))
        epochs_run = epoch + 1
        if val is not None:
            metrics = evaluate(model, val[0], val[1], mask=val[2], task=task)
            v = metrics["loss"].double()
            rows["val_loss"].append(torch.where(frozen, nan, v))
            if task == "classification":
                rows["val_acc"].append(torch.where(frozen, nan, metrics["acc"].double()))
            improved = (v < best_loss) & ~frozen
            best_loss = torch.where(improved, v, best_loss)
            best_epoch[improved] = epoch
            bad = torch.where(improved, torch.zeros_like(bad), bad + (~frozen).long())
            with torch.no_grad():
                imp = improved.to(device)
                for p, b in zip(params, best, strict=True):
                    b[imp] = p[imp]
            if patience is not None:
                newly = (bad >= patience) & ~frozen
                if bool(newly.any()):
                    stopped_epoch[newly] = epoch
                    frozen |= newly
                    fz = newly.to(device)
                    with torch.no_grad():
                        for p, b in zip(params, best, strict=True):
                            p[fz] = b[fz]
            bar.set_postfix(val_loss=f"{float(v[~frozen].mean()) if (~frozen).any() else 0:.4f}",
                            active=int((~frozen).sum()))
            if bool(frozen.all()):
                break
    bar.close()
    if val is not None and restore_best and epochs_run > 0:
        with torch.no_grad():
            for p, b in zip(params, best, strict=True):
                p.copy_(b)
    history = {k: torch.stack(v) if v else torch.zeros(0, s_count, dtype=torch.float64)
               for k, v in rows.items()}
    names = list(getattr(model, "subset_names", []))
    return FitResult(history, best_epoch, stopped_epoch, epochs_run, names)
