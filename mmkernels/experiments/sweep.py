"""Sweeps over modality subsets: one cell = (dataset, seed, fraction) trains every subset.

A cell trains all 2^K - 1 subset models at once (:class:`mmkernels.nn.SubsetEnsemble` with
:func:`mmkernels.training.fit`, the paper's setting: one encoder and one head per subset),
measures each subset's test accuracy / loss (Tables 1 and 2, the uni-modal baselines), and,
at the fractions in ``SweepConfig.refit_fractions``, freezes the trained encoders and refits a
linear head on each (:func:`mmkernels.eta.refit_quality`, Table 3's gamma) and runs the
modality-laziness probe (late fusion only; see :func:`laziness_probe`).

Defaults are the paper's where public (hidden 128, Adam lr 0.01, batch 2048, late fusion for
IEMOCAP); epochs, seeds and weight decay are not public and are documented parameters.
Every record is a flat dict (long format), so a sweep's output is a list of rows per table.

Resumable: with ``store=DIR``, :func:`run_sweep` appends each finished cell to the
append-only results store in DIR (:mod:`.store`) and, on a later run, takes the cells found
there instead of training them again. A cell's key hashes the data (names, shapes, the bytes of
every tensor), the training settings and the cell (seed, fraction, whether it refits), so a
changed setting never reuses a stale cell. A killed sweep thus resumes without redoing or
losing finished cells. Cells run in this process or on any executor (:mod:`.executors`).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmkernels.experiments.data import MultiModalDataset
from mmkernels.subsets import all_subsets, modality_labels, subset_name

from .executors import as_completed_any
from .io import to_jsonable
from .sampling import stratified_fraction
from .store import ResultStore

__all__ = ["SweepConfig", "SweepConfigError", "Prepared", "prepare", "run_cell", "run_sweep",
           "laziness_probe", "PAPER_FRACTIONS", "MAX_MODALITIES", "data_fingerprint", "cell_key"]

PAPER_FRACTIONS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# SubsetEnsemble's limit (2^20 - 1 subsets); check it before prepare() enumerates them.
MAX_MODALITIES = 20


class SweepConfigError(ValueError):
    """A SweepConfig setting out of range; ``field`` names it, ``detail`` says why."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"SweepConfig.{field}: {detail}")
        self.field, self.detail = field, detail


def _int_at_least(field: str, value: Any, low: int) -> None:
    ok = not isinstance(value, bool)
    try:
        ok = ok and operator.index(value) >= low
    except TypeError:
        ok = False
    if not ok:
        raise SweepConfigError(field, f"expected an int >= {low}, got {value!r}")


def _finite(field: str, value: Any, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise SweepConfigError(field, f"expected a finite number {'>' if positive else '>='} "
                                      f"0, got {value!r}")


@dataclass
class SweepConfig:
    """Settings of a sweep.

    hidden: encoder width per modality (late) or of the joint encoder (early); paper: 128.
    fusion: "late" (paper's IEMOCAP setting: one linear + ReLU per modality, concatenated)
        or "early" (concatenate the raw features, one linear + ReLU).
    epochs: training epochs (not public; default 100, no early stopping).
    batch_size, lr: Adam's batch and learning rate (paper: 2048, 0.01).
    weight_decay: Adam L2 (not public; default 0).
    seeds: one cell per seed and fraction; the seed drives the model initialisation, the
        batch order and the fraction's subsample.
    fractions: training-set fractions (Table 2); 1.0 is Table 1.
    refit_fractions: fractions at which the frozen encoders get refitted heads (Table 3)
        and the laziness probe runs; each must be one of ``fractions`` (None: the largest).
    head_l2: l2 of the refitted heads (and of the probe's): None (default) chooses it per
        subset by head_cv_folds-fold cross-validation on the cell's training rows
        (mmkernels.heads.fit_cv); a float fixes it for every subset.
    head_cv_folds: folds of that cross-validation.
    probe: run the modality-laziness probe (late fusion only).
    """

    hidden: int = 128
    fusion: str = "late"
    epochs: int = 100
    batch_size: int = 2048
    lr: float = 0.01
    weight_decay: float = 0.0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    fractions: list[float] = field(default_factory=lambda: list(PAPER_FRACTIONS))
    refit_fractions: list[float] | None = None
    head_l2: float | None = None
    head_cv_folds: int = 5
    probe: bool = True

    def __post_init__(self) -> None:
        """Refuse settings that would train nothing or fail midway (SweepConfigError)."""
        for name in ("hidden", "epochs", "batch_size"):
            _int_at_least(name, getattr(self, name), 1)
        if self.fusion not in ("late", "early"):
            raise SweepConfigError("fusion", f'expected "late" or "early", got {self.fusion!r}')
        _finite("lr", self.lr, positive=True)
        _finite("weight_decay", self.weight_decay, positive=False)
        if self.head_l2 is not None:
            _finite("head_l2", self.head_l2, positive=False)
        _int_at_least("head_cv_folds", self.head_cv_folds, 2)
        if not isinstance(self.seeds, (list, tuple)) or not self.seeds:
            raise SweepConfigError("seeds", f"expected a non-empty list, got {self.seeds!r}")
        for seed in self.seeds:
            _int_at_least("seeds", seed, 0)
        if len(set(self.seeds)) != len(self.seeds):
            raise SweepConfigError("seeds", f"a seed is given twice in {list(self.seeds)}")
        self._check_fractions("fractions", self.fractions)
        if self.refit_fractions is None:
            self.refit_fractions = [max(self.fractions)]
        self._check_fractions("refit_fractions", self.refit_fractions, empty_ok=True)
        for f in self.refit_fractions:
            if not any(abs(f - g) < 1e-12 for g in self.fractions):
                raise SweepConfigError("refit_fractions", f"{f!r} is not one of the fractions "
                                                          f"{list(self.fractions)}")

    @staticmethod
    def _check_fractions(name: str, values: Any, empty_ok: bool = False) -> None:
        if not isinstance(values, (list, tuple)) or not (values or empty_ok):
            raise SweepConfigError(name, f"expected a non-empty list, got {values!r}")
        for i, f in enumerate(values):
            if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1):
                raise SweepConfigError(name, f"expected fractions in (0, 1], got {f!r}")  # NaN too
            if any(abs(f - g) < 1e-12 for g in values[:i]):
                raise SweepConfigError(name, f"{f!r} is given twice")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def head_l2_text(self) -> str:
        """How the refitted heads' l2 is chosen, for reports."""
        if self.head_l2 is None:
            return (f"l2 chosen per subset by {self.head_cv_folds}-fold cross-validation on the "
                    "training rows (mean held-out risk)")
        return f"l2 fixed at {self.head_l2:g} for every subset"


@dataclass
class Prepared:
    """A dataset as train/test tensors plus its subsets and their names."""

    name: str
    task: str
    modality_names: list[str]
    train_xs: list[Tensor]
    train_y: Tensor
    test_xs: list[Tensor]
    test_y: Tensor
    num_outputs: int
    subsets: list[tuple[int, ...]]
    subset_names: list[str]
    train_mask: Tensor | None = None
    test_mask: Tensor | None = None
    standardized: bool = False

    @property
    def num_modalities(self) -> int:
        return len(self.modality_names)


def prepare(ds: MultiModalDataset, name: str, *, split_seed: int = 0,
            test_size: float = 0.3, standardize: bool = False) -> Prepared:
    """Tensors of a dataset's train and test rows. A dataset without a split gets a seeded
    (stratified for classification) train/test split of ``test_size``; a "valid" split is
    left out (the paper describes none).

    Presence: a dataset's presence mask (when some modality is absent somewhere) travels with
    the rows (``train_mask`` / ``test_mask``, bool [n, K]) to training, evaluation and the
    refits, which then never read an absent modality's stored features: every subset is
    trained and scored on every row, seeing on each row the modalities of the subset that the
    row has (absent blocks are zero in the fused ops: the paper's masking map).

    standardize: scale each feature to mean 0 and standard deviation 1 with the statistics
    of the TRAINING rows where its modality is present (a constant feature is only centred;
    absent entries become 0), as the bundled loaders do; `mmkernels sweep` does it by default.
    Unscaled features break training: a feature block with values in the hundreds drives
    every ReLU unit of its encoder dead within a few Adam steps (the block's positive mean
    moves every pre-activation by ~ lr * d * mean per step), and that subset stays at chance.
    """
    if ds.split is None:
        rng = np.random.default_rng(split_seed)
        is_test = np.zeros(ds.n, dtype=bool)
        if ds.task == "classification":
            for c in np.unique(ds.labels):
                rows = np.flatnonzero(ds.labels == c)
                k = int(round(test_size * len(rows)))
                is_test[rng.choice(rows, size=k, replace=False)] = True
        else:
            is_test[rng.choice(ds.n, size=int(round(test_size * ds.n)), replace=False)] = True
        train, test = ds.subset(~is_test), ds.subset(is_test)
    else:
        train, test = ds.train(), ds.test()
    if train.n == 0 or test.n == 0:
        raise ValueError(f"{name}: needs train and test rows, got {train.n} and {test.n}")
    if ds.task == "classification":
        num_outputs = ds.n_classes
    else:
        num_outputs = 1 if ds.labels.ndim == 1 else int(ds.labels.shape[1])
    labels = modality_labels(ds.names)
    subs = all_subsets(ds.n_modalities)
    masked = ds.presence is not None and not bool(np.all(ds.presence))
    train_mask = train.torch_presence() if masked else None
    test_mask = test.torch_presence() if masked else None
    train_xs, test_xs = train.to_torch(), test.to_torch()
    if standardize:
        train_xs, test_xs = _standardized(train_xs, test_xs, train_mask, test_mask)
    return Prepared(name, ds.task, ds.names, train_xs, train.torch_labels(), test_xs,
                    test.torch_labels(), num_outputs, subs,
                    [subset_name(s, labels) for s in subs], train_mask, test_mask, standardize)


def _standardized(train_xs: list[Tensor], test_xs: list[Tensor], train_mask: Tensor | None,
                  test_mask: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
    """Each feature standardised with the present training rows' mean and std (float64)."""
    out_tr, out_te = [], []
    for k, (tr, te) in enumerate(zip(train_xs, test_xs, strict=True)):
        rows = tr.double() if train_mask is None else tr.double()[train_mask[:, k]]
        mean = rows.mean(0) if len(rows) else torch.zeros(tr.shape[1], dtype=torch.float64)
        std = rows.std(0, correction=0) if len(rows) else torch.ones_like(mean)
        std = torch.where(std > 0, std, torch.ones_like(std))
        scaled = []
        for x, m in ((tr, train_mask), (te, test_mask)):
            z = (x.double() - mean) / std
            if m is not None:
                z = torch.where(m[:, k : k + 1], z, 0.0)
            scaled.append(z.to(x.dtype))
        out_tr.append(scaled[0])
        out_te.append(scaled[1])
    return out_tr, out_te


def _model(data: Prepared, cfg: SweepConfig, seed: int):
    from mmkernels.nn import SubsetEnsemble

    return SubsetEnsemble([x.shape[1] for x in data.train_xs], cfg.hidden,
                          data.num_outputs, subsets=data.subsets, fusion=cfg.fusion, seed=seed)


@torch.no_grad()
def laziness_probe(model, data: Prepared, xs: Sequence[Tensor], y: Tensor, *,
                   l2: float | None = None, mask: Tensor | None = None,
                   cv_folds: int = 5) -> list[dict[str, Any]]:
    """Modality-laziness probe for a late-fusion SubsetEnsemble.

    For each modality k, refit a linear head on modality k's block of the latent of the
    jointly trained all-modality model ("joint"), and on the latent of the model trained on k
    alone ("alone"); both heads are fitted on the training rows ``xs, y`` (presence ``mask``;
    the test rows with ``data.test_mask``) and scored on the test rows. joint risk > alone risk
    (or joint accuracy < alone accuracy) means the joint training under-learned modality k
    (modality laziness / competition). l2: None chooses it per head by cv_folds-fold
    cross-validation on the training rows (as the refits), a float fixes it.
    """
    from mmkernels import heads

    if model.fusion != "late":
        raise ValueError("the laziness probe needs a late-fusion model (one block per modality)")
    k_all = data.num_modalities
    full = data.subsets.index(tuple(range(k_all)))
    offsets = np.cumsum([0, *model.hidden])

    def blocks(x: Sequence[Tensor], m: Tensor | None) -> Tensor:
        z = model.latents(list(x), m)
        out = []
        for k in range(k_all):
            lo, hi = offsets[k], offsets[k + 1]
            out.append(z[full, :, lo:hi])
        for k in range(k_all):
            lo, hi = offsets[k], offsets[k + 1]
            out.append(z[data.subsets.index((k,)), :, lo:hi])
        return torch.stack(out)

    num_classes = data.num_outputs if data.task == "classification" else None
    fold = None
    if l2 is None:
        # Rows sorted by fold: every fold is a contiguous block the solver reads in place.
        fold = heads.kfold(y, min(cv_folds, int(y.shape[0])),
                           stratify=data.task == "classification")
        order = torch.argsort(fold, stable=True)
        xs, y, fold = [x[order] for x in xs], y[order], fold[order]
        mask = None if mask is None else mask[order]
    z_tr, z_te = blocks(xs, mask), blocks(data.test_xs, data.test_mask)
    if fold is not None:
        fitted, _ = heads.fit_cv(z_tr, y, task=data.task, num_classes=num_classes, folds=fold)
    else:
        fitted = heads.fit(z_tr, y, task=data.task, l2=l2, num_classes=num_classes)
    risk = fitted.risk(z_te, data.test_y)
    acc = fitted.accuracy(z_te, data.test_y) if data.task == "classification" else None
    rows = []
    for k in range(k_all):
        j = k_all + k
        rows.append({
            "modality": data.modality_names[k],
            "joint_risk": float(risk[k]), "alone_risk": float(risk[j]),
            "joint_acc_pct": None if acc is None else 100.0 * float(acc[k]),
            "alone_acc_pct": None if acc is None else 100.0 * float(acc[j]),
            "risk_gap": float(risk[k] - risk[j]),
            "acc_gap_points": None if acc is None else 100.0 * float(acc[k] - acc[j]),
        })
    return rows


#: Record field of each test metric of mmkernels.metrics (classification, then regression);
#: the end-to-end test loss (cross-entropy or MSE) is "test_loss".
TEST_METRICS = {"accuracy": "test_acc", "unweighted_accuracy": "test_ua",
                "f1_macro": "test_f1_macro", "f1_weighted": "test_f1_weighted",
                "mae": "test_mae", "pearson": "test_pearson"}


@torch.no_grad()
def _test_metrics(model, data: Prepared, chunk: int = 8192) -> dict[str, Tensor]:
    """Every subset's test metrics (mmkernels.metrics, [S] each) from the model's test
    outputs, computed in eval mode in chunks of rows."""
    from mmkernels import metrics

    was_training = model.training
    model.eval()
    try:
        n = data.test_y.shape[0]
        mask = data.test_mask
        outs = [model([x[lo:lo + chunk] for x in data.test_xs],
                      None if mask is None else mask[lo:lo + chunk]) for lo in range(0, n, chunk)]
    finally:
        model.train(was_training)
    if data.task == "classification":
        pred = torch.cat([o.argmax(dim=-1) for o in outs], dim=1)
        return metrics.classification_metrics(pred, data.test_y, data.num_outputs)
    out = torch.cat(outs, dim=1)
    return metrics.regression_metrics(out[..., 0] if data.test_y.dim() == 1 else out,
                                      data.test_y)


def run_cell(data: Prepared, seed: int, fraction: float, cfg: SweepConfig) -> dict[str, list]:
    """Train every subset on a ``fraction`` of the training rows (rule: sampling module) and
    measure it. Returns {"subsets": [...], "refit": [...], "pairs": [...], "probe": [...],
    "diverged": [...]}, lists of flat records (refit/pairs/probe empty unless fraction is in
    refit_fractions). A cell in which any subset's training diverged (a loss or a parameter
    not finite) has only "diverged" records, one per diverged subset (see :func:`_diverged`):
    its other numbers would compare subsets that were not all trained."""
    from mmkernels import eta
    from mmkernels.training import evaluate, fit

    torch.manual_seed(seed)
    y_np = data.train_y.numpy()
    sub_seed = int(np.random.SeedSequence([seed, int(round(fraction * 1e9))]).generate_state(1)[0])
    idx = stratified_fraction(y_np if data.task == "classification" else None, fraction,
                              sub_seed, n=len(y_np))
    it = torch.as_tensor(idx)
    xs, y = [x[it] for x in data.train_xs], data.train_y[it]
    mask = None if data.train_mask is None else data.train_mask[it]
    model = _model(data, cfg, seed)
    res = fit(model, xs, y, mask=mask, task=data.task, epochs=cfg.epochs,
              batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed,
              progress=False)
    test = evaluate(model, data.test_xs, data.test_y, mask=data.test_mask, task=data.task)
    train = evaluate(model, xs, y, mask=mask, task=data.task)
    scores = _test_metrics(model, data)
    base = {"dataset": data.name, "seed": seed, "fraction": fraction, "n_train": len(idx)}
    out: dict[str, list] = {"subsets": [], "refit": [], "pairs": [], "probe": [], "diverged": []}
    diverged = _diverged(data, res, model, [test["loss"], train["loss"]])
    if diverged:  # reported as diverged, never stored as a result (nor refitted)
        out["diverged"] = [{**base, **row} for row in diverged]
        return out
    for s, sub in enumerate(data.subsets):
        out["subsets"].append({
            **base, "subset": data.subset_names[s], "size": len(sub),
            "modalities": " ".join(data.modality_names[k] for k in sub),
            "test_loss": float(test["loss"][s]), "train_loss": float(train["loss"][s]),
            **{key: float(scores[m][s]) if m in scores else None
               for m, key in TEST_METRICS.items()},
            "train_acc": float(train["acc"][s]) if "acc" in train else None,
            "epochs_run": res.epochs_run,
        })
    if not _refits(cfg, fraction):
        return out
    # model.latents itself (not a wrapper): eta recognises a late-fusion model and refits each
    # subset on its own modalities' blocks only.
    table = eta.refit_quality(
        model.latents, xs, y, data.test_xs, data.test_y, task=data.task,
        train_mask=mask, test_mask=data.test_mask, subsets=data.subsets,
        names=data.subset_names, l2="cv" if cfg.head_l2 is None else cfg.head_l2,
        cv_folds=cfg.head_cv_folds,
        num_classes=data.num_outputs if data.task == "classification" else None)
    by_name = {r["subset"]: r for r in table.rows}
    e2e = {r["subset"]: r for r in out["subsets"]}
    for row in table.rows:
        out["refit"].append({**base, "subset": row["subset"],
                             "size": len(row["modalities"].split()),
                             "refit_test_risk": row["test_risk"],
                             "refit_test_acc": row["test_accuracy"],
                             "converged": row["converged"], "refit_l2": row["l2"],
                             "refit_cv_risk": row["cv_risk"]})
    for m, sm in enumerate(data.subsets):
        for n_, sn in enumerate(data.subsets):
            if m == n_ or not set(sn) < set(sm):
                continue
            a, b = data.subset_names[m], data.subset_names[n_]
            ra, rb = by_name[a], by_name[b]
            acc_diff = None if e2e[a]["test_acc"] is None else \
                100.0 * (e2e[a]["test_acc"] - e2e[b]["test_acc"])
            out["pairs"].append({
                **base, "M": a, "N": b, "size_M": len(sm), "size_N": len(sn),
                "test_acc_diff_points": acc_diff,
                "test_loss_diff": e2e[a]["test_loss"] - e2e[b]["test_loss"],
                "gamma_loss": ra["test_risk"] - rb["test_risk"],
                "gamma_acc_points": None if ra["test_accuracy"] is None else
                100.0 * (ra["test_accuracy"] - rb["test_accuracy"]),
            })
    if cfg.probe and cfg.fusion == "late" and data.num_modalities > 1:
        for row in laziness_probe(model, data, xs, y, l2=cfg.head_l2, mask=mask,
                                  cv_folds=cfg.head_cv_folds):
            out["probe"].append({**base, **row})
    return out


def _diverged(data: Prepared, res: Any, model: Any, losses: Sequence[Tensor]) -> list[dict]:
    """One record per subset whose training diverged: {"subset", "epoch", "detected_in"}.
    epoch (1-based) is the first whose mean training loss was not finite; a subset whose
    losses stayed finite but whose parameters (after the last step) or final train / test
    loss are not gets the last epoch run."""
    history = res.history["train_loss"]
    rows = []
    for s, name in enumerate(data.subset_names):
        stop = int(res.stopped_epoch[s])
        h = history[: stop + 1 if stop >= 0 else None, s]
        bad = (~torch.isfinite(h)).nonzero().flatten()
        if bad.numel():
            epoch, where = int(bad[0]) + 1, "training loss"
        elif not all(bool(torch.isfinite(p[s]).all()) for p in model.parameters()):
            epoch, where = res.epochs_run, "parameters"
        elif not all(math.isfinite(float(loss[s])) for loss in losses):
            epoch, where = res.epochs_run, "train or test loss"
        else:
            continue
        rows.append({"subset": name, "epoch": epoch, "detected_in": where})
    return rows


def _stored_diverged(records: dict[str, list]) -> dict[str, list]:
    """A stored cell as run_cell would return it now: one that an older version stored with
    a non-finite (null) loss is a diverged cell (its epoch unknown), not a result."""
    nulls = [r for r in records.get("subsets", []) if r.get("test_loss") is None
             or r.get("train_loss") is None]
    if not nulls:
        return records
    keep = ("dataset", "seed", "fraction", "n_train")
    return {"subsets": [], "refit": [], "pairs": [], "probe": [],
            "diverged": [{**{k: r.get(k) for k in keep}, "subset": r.get("subset"),
                          "epoch": None, "detected_in": "stored loss"} for r in nulls]}


def data_fingerprint(data: Prepared) -> str:
    """sha256 over the dataset's names, task, shapes and tensor bytes (presence masks
    included when the data have them)."""
    h = hashlib.sha256()
    h.update(json.dumps([data.name, data.task, data.modality_names, data.num_outputs]).encode())
    masks = [m for m in (data.train_mask, data.test_mask) if m is not None]
    for t in [*data.train_xs, data.train_y, *data.test_xs, data.test_y, *masks]:
        c = t.detach().contiguous().cpu()
        h.update(str((tuple(c.shape), str(c.dtype))).encode())
        h.update(c.numpy().tobytes())
    return h.hexdigest()


def _refits(cfg: SweepConfig, fraction: float) -> bool:
    return any(abs(fraction - f) < 1e-12 for f in cfg.refit_fractions)


def _settings(cfg: SweepConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items()
            if k not in ("seeds", "fractions", "refit_fractions")}


def cell_key(fingerprint: str, cfg: SweepConfig, seed: int, fraction: float) -> str:
    """Hex key of one cell: the data fingerprint, the training settings (not the seed and
    fraction lists), the seed, the fraction and whether the cell refits."""
    blob = json.dumps([fingerprint, _settings(cfg), int(seed), repr(float(fraction)),
                       _refits(cfg, fraction)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cell_payload(data: Prepared, seed: int, fraction: float, cfg: SweepConfig) -> dict:
    """What a worker returns for one cell: its records (JSON types), runtime and versions."""
    from .provenance import versions

    t0 = time.perf_counter()
    recs = to_jsonable(run_cell(data, seed, fraction, cfg))
    return {"records": recs, "runtime_s": time.perf_counter() - t0, "versions": versions()}


def run_sweep(data: Prepared, cfg: SweepConfig, *, progress: bool = True,
              desc: str | None = None, store: str | Path | ResultStore | None = None,
              executor: Any = None) -> dict[str, list]:
    """Every (seed, fraction) cell of ``cfg`` on ``data``, with a tqdm bar over cells; the
    records of all cells concatenated per table, in (fraction, seed) order, as JSON types
    (a NaN metric is None), whichever run or worker computed them. A diverged cell
    contributes only its "diverged" records (see :func:`run_cell`).

    Args:
        store: folder of the results store (:mod:`.store`), or a :class:`~.store.ResultStore`
            (whose lock the caller may already hold): each finished cell is appended there as
            soon as it finishes, and cells already there are not run again.
        executor: any concurrent.futures-style executor (``submit(fn, *args)`` returning a
            future with ``result()``): :class:`~.executors.RayExecutor`, a
            ``ProcessPoolExecutor``, Dask's ``client.get_executor()``, submitit's
            ``AutoExecutor``. The unfinished cells are submitted at once and stored in the
            order they finish. None runs them in this process, one after another.
    """
    from tqdm.auto import tqdm

    # The fingerprint (a hash of every data byte) only matters for matching stored cells.
    fp = data_fingerprint(data) if store is not None else ""
    keys: dict[str, tuple[int, float]] = {}
    for f in cfg.fractions:
        for s in cfg.seeds:
            keys.setdefault(cell_key(fp, cfg, s, f), (s, f))
    results: dict[str, dict] = {}
    rs = store if isinstance(store, ResultStore) or store is None else ResultStore(store)
    with rs.writer() if rs is not None else nullcontext() as writer:
        if rs is not None:
            results = {k: _stored_diverged(r["records"]) for k, r in rs.records().items()
                       if k in keys and isinstance(r.get("records"), dict)}
        todo = [k for k in keys if k not in results]
        bar = tqdm(total=len(keys), initial=len(keys) - len(todo), unit="cell",
                   desc=desc or f"sweep {data.name}", disable=not progress)

        def finish(key: str, payload: dict) -> None:
            seed, fraction = keys[key]
            results[key] = payload["records"]
            if writer is not None:
                writer.append({"key": key, "dataset": data.name, "seed": seed,
                               "fraction": fraction, "data": fp, "config": _settings(cfg),
                               "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime()), **payload})
            bar.update(1)

        if executor is None:
            for key in todo:
                finish(key, _cell_payload(data, *keys[key], cfg))
        else:
            futures = [executor.submit(_cell_payload, data, *keys[key], cfg) for key in todo]
            for i in as_completed_any(futures):
                finish(todo[i], futures[i].result())
        bar.close()
    out: dict[str, list] = {"subsets": [], "refit": [], "pairs": [], "probe": [], "diverged": []}
    for key in keys:
        for table, rows in results[key].items():
            out.setdefault(table, []).extend(rows)
    return out
