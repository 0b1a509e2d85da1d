"""mmkernels.training.fit: determinism, equivalence with separate training, early stopping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmkernels.nn import SubsetEnsemble
from mmkernels.training import epoch_batches, evaluate, fit, split_validation

DIMS = [4, 3, 5]
F64 = torch.float64


def _data(n=60, seed=0, task="classification"):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=F64) for d in DIMS]
    if task == "classification":
        y = (xs[0][:, 0] + xs[1][:, 0] > 0).long() + (xs[2][:, 0] > 1).long()
    else:
        y = xs[0][:, 0] - xs[2][:, 1] + 0.1 * torch.randn(n, generator=g, dtype=F64)
    mask = torch.rand(n, 3, generator=g) < 0.8
    return xs, y, mask


def test_fit_is_bitwise_deterministic():
    xs, y, mask = _data()
    runs = []
    for _ in range(2):
        model = SubsetEnsemble(DIMS, 8, 3, fusion="late", seed=3)
        res = fit(model, [x.float() for x in xs], y, mask=mask, epochs=3, batch_size=16,
                  val_fraction=0.25, seed=11, progress=False)
        runs.append((model, res))
    (m1, r1), (m2, r2) = runs
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    for key in r1.history:
        assert torch.equal(r1.history[key], r2.history[key])
    assert set(r1.history) == {"train_loss", "train_acc", "val_loss", "val_acc"}
    assert r1.history["val_acc"].shape == (3, 7)
    assert r1.subset_names == m1.subset_names


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_fit_equals_separately_trained_models(fusion):
    xs, y, mask = _data(task="regression")
    model = SubsetEnsemble(DIMS, 8, 1, fusion=fusion, dtype=F64, seed=1)
    separate = [model.subset_model(s) for s in range(model.num_subsets)]
    res = fit(model, xs, y, mask=mask, task="regression", epochs=3, batch_size=16, lr=0.01,
              weight_decay=1e-3, seed=4, progress=False)
    assert set(res.history) == {"train_loss"} and res.epochs_run == 3
    # the same batch order, each subset model trained alone with plain PyTorch and Adam
    g = torch.Generator().manual_seed(4)
    batches = [epoch_batches(60, 16, g) for _ in range(3)]
    for s, m in enumerate(separate):
        opt = torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=1e-3)
        for epoch in batches:
            for idx in epoch:
                opt.zero_grad()
                F.mse_loss(m([x[idx] for x in xs], mask[idx]).squeeze(1), y[idx]).backward()
                opt.step()
        for a, b in zip(model.subset_model(s).parameters(), m.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_early_stopping_freezes_subsets_at_their_best():
    xs, y, mask = _data(n=80, seed=5)
    y = torch.randint(0, 3, (80,), generator=torch.Generator().manual_seed(0))  # noise labels
    val = ([x[60:] for x in xs], y[60:], mask[60:])
    train = ([x[:60] for x in xs], y[:60], mask[:60])
    model = SubsetEnsemble(DIMS, 16, 3, fusion="early", dtype=F64, seed=2)
    res = fit(model, train[0], train[1], mask=train[2], val_data=val, epochs=40, batch_size=20,
              lr=0.05, patience=2, restore_best=False, progress=False)
    stopped = res.stopped_epoch >= 0
    assert stopped.any(), "noise labels with lr 0.05 should overfit and stop some subsets"
    final = evaluate(model, *val[:2], mask=val[2])["loss"].double()
    vl = res.history["val_loss"]
    for s in range(7):
        if stopped[s]:
            e = int(res.stopped_epoch[s])
            assert int(res.best_epoch[s]) == e - 2
            assert torch.isnan(vl[e + 1 :, s]).all()
            torch.testing.assert_close(final[s], vl[res.best_epoch[s], s])
        else:
            torch.testing.assert_close(final[s], vl[res.epochs_run - 1, s])
    # restore_best=True puts every subset at its best epoch
    model2 = SubsetEnsemble(DIMS, 16, 3, fusion="early", dtype=F64, seed=2)
    res2 = fit(model2, train[0], train[1], mask=train[2], val_data=val, epochs=40,
               batch_size=20, lr=0.05, patience=2, progress=False)
    final2 = evaluate(model2, *val[:2], mask=val[2])["loss"].double()
    best = res2.history["val_loss"][res2.best_epoch, torch.arange(7)]
    torch.testing.assert_close(final2, best)


def test_split_and_argument_errors():
    g = torch.Generator().manual_seed(0)
    tr, va = split_validation(10, 0.3, g)
    assert len(va) == 3 and len(tr) == 7 and set(tr.tolist()) | set(va.tolist()) == set(range(10))
    xs, y, _ = _data()
    model = SubsetEnsemble(DIMS, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match="patience"):
        fit(model, xs, y, patience=2, progress=False)
    with pytest.raises(ValueError, match="task"):
        fit(model, xs, y, task="ranking", progress=False)
    with pytest.raises(ValueError, match="rows"):
        fit(model, xs, y[:5], progress=False)


def test_bench_ensemble_quick_writes_table_json_and_plot(tmp_path, capsys):
    from mmkernels.experiments.bench import ensemble as bench

    png, out = tmp_path / "scaling.png", tmp_path / "bench.json"
    assert bench.main(["--quick", "--repeats", "1", "--plot", str(png), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eager-masked" in printed and "eager-present" in printed
    assert png.stat().st_size > 1000
    import json

    data = json.loads(out.read_text())
    assert [r["fusion"] for r in data["iemocap"]] == ["early", "late"]
    assert [r["S"] for r in data["scaling"]] == [15, 31]


def test_bench_eager_models_match_ensemble_semantics():
    from mmkernels.experiments.bench.ensemble import _EagerModel

    xs = [torch.randn(6, d, dtype=F64) for d in DIMS]
    ens = SubsetEnsemble(DIMS, 4, 3, fusion="late", dtype=F64)
    for s, subset in enumerate(ens.subsets):
        eager = _EagerModel(DIMS, subset, 4, 3, "late", present_only=True).double()
        ref = ens.subset_model(s)
        with torch.no_grad():
            for j, k in enumerate(subset):
                eager.encs[j].weight.copy_(ref[0].linears[k].weight)
                eager.encs[j].bias.copy_(ref[0].linears[k].bias)
            cols = torch.cat([torch.arange(4 * k, 4 * k + 4) for k in subset])
            eager.head.weight.copy_(ref[1].weight[:, cols])
            eager.head.bias.copy_(ref[1].bias)
        torch.testing.assert_close(eager(xs), ens(xs)[s])


def test_fit_learns_and_more_modalities_help():
    # the label needs all three modalities; the full subset should beat the unimodal ones
    xs, y, _ = _data(n=400, seed=9)
    model = SubsetEnsemble(DIMS, 16, 3, dtype=F64, seed=0)
    res = fit(model, xs, y, epochs=30, batch_size=64, lr=0.02, val_fraction=0.25, seed=0,
              progress=False)
    acc = res.history["val_acc"][res.best_epoch, torch.arange(7)]
    names = res.subset_names
    assert acc[names.index("ABC")] > 0.8
    assert acc[names.index("ABC")] > acc[names.index("A")] + 0.05
    assert acc[names.index("ABC")] > acc[names.index("C")] + 0.05


# ---- the same inputs as the modules: dicts, masks, DataLoaders ---------------------------------

NAMES = ["text", "audio", "video"]


def _named(xs, mask):
    return dict(zip(NAMES, xs, strict=True)), {n: mask[:, k] for k, n in enumerate(NAMES)}


def _ensemble(names=True, fusion="late"):
    dims = dict(zip(NAMES, DIMS, strict=True)) if names else DIMS
    return SubsetEnsemble(dims, 8, 3, fusion=fusion, dtype=F64, seed=3)


def _same_training(a, b):
    (ma, ra), (mb, rb) = a, b
    for p, q in zip(ma.parameters(), mb.parameters(), strict=True):
        assert torch.equal(p, q)
    assert set(ra.history) == set(rb.history)
    for key in ra.history:
        # bitwise, NaN (a stopped subset's entries) included
        torch.testing.assert_close(ra.history[key], rb.history[key], rtol=0, atol=0,
                                   equal_nan=True, msg=key)
    assert torch.equal(ra.best_epoch, rb.best_epoch)
    assert torch.equal(ra.stopped_epoch, rb.stopped_epoch)
    assert ra.epochs_run == rb.epochs_run


def test_fit_and_evaluate_take_dicts_and_masks_like_the_modules():
    xs, y, mask = _data()
    dx, dmask = _named(xs, mask)
    kwargs = {"epochs": 3, "batch_size": 16, "val_fraction": 0.25, "seed": 2, "progress": False}
    with_lists = (m := _ensemble(), fit(m, xs, y, mask=mask, **kwargs))
    with_dicts = (m := _ensemble(), fit(m, dx, y, mask=dmask, **kwargs))
    _same_training(with_lists, with_dicts)
    model = with_dicts[0]
    want = evaluate(model, xs, y, mask=mask, batch_size=7)
    for got in (evaluate(model, dx, y, mask=dmask, batch_size=7),
                evaluate(model, dx, y, mask=mask, batch_size=7)):
        assert torch.equal(got["loss"], want["loss"]) and torch.equal(got["acc"], want["acc"])
    # a dict mask with a wrong key is refused by name
    with pytest.raises(ValueError, match=r"mask must have the keys .*unexpected \['vid'\]"):
        fit(_ensemble(), dx, y, mask={**dmask, "vid": dmask.pop("video")}, progress=False)


class _Rows(torch.utils.data.Dataset):
    """Row i as a dict batch element: the modalities by name, "mask" (a dict) and "y"."""

    def __init__(self, xs, y, mask):
        self.xs, self.y, self.mask = xs, y, mask

    def __len__(self):
        return self.y.shape[0]

    def __getitem__(self, i):
        return {**{n: x[i] for n, x in zip(NAMES, self.xs, strict=True)},
                "mask": {n: self.mask[i, k] for k, n in enumerate(NAMES)}, "y": self.y[i]}


class _FitOrder:
    """A batch sampler drawing each epoch's batches exactly as fit does for tensors."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter([b.tolist() for b in epoch_batches(self.n, self.batch_size, self.gen)])


def test_fit_on_a_dataloader_equals_fit_on_tensors():
    # dict batches for training, tuple batches for validation; per-subset early stopping
    xs, y, mask = _data(n=80, seed=5)
    y = torch.randint(0, 3, (80,), generator=torch.Generator().manual_seed(0))  # noise labels
    tr, va = slice(0, 60), slice(60, None)
    val = ([x[va] for x in xs], y[va], mask[va])
    kwargs = {"epochs": 12, "lr": 0.05, "patience": 2, "progress": False}
    on_tensors = (m := _ensemble(fusion="early"),
                  fit(m, [x[tr] for x in xs], y[tr], mask=mask[tr], val_data=val, batch_size=16,
                      seed=4, **kwargs))
    train_loader = DataLoader(_Rows([x[tr] for x in xs], y[tr], mask[tr]),
                              batch_sampler=_FitOrder(60, 16, seed=4))
    val_rows = list(zip(zip(*val[0]), val[1], val[2], strict=True))  # (xs, y, mask), xs a list
    val_loader = DataLoader(val_rows, batch_size=20)  # one batch, as evaluate takes tensors
    on_loader = (m := _ensemble(fusion="early"),
                 fit(m, train_loader, val_data=val_loader, **kwargs))
    assert (on_tensors[1].stopped_epoch >= 0).any(), "some subsets should have stopped"
    _same_training(on_tensors, on_loader)
    got = evaluate(on_loader[0], DataLoader(val_rows, batch_size=7))
    want = evaluate(on_loader[0], *val[:2], mask=val[2])
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-12, atol=0)
    assert torch.equal(got["acc"], want["acc"])


def test_fit_on_a_seeded_dataloader_is_bitwise_deterministic():
    xs, y, mask = _data()
    rows = list(zip(zip(*xs), y, mask, strict=True))  # (xs, y, mask) tuples, unnamed model

    def run():
        loader = DataLoader(rows, batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(7))
        model = _ensemble(names=False)
        return model, fit(model, loader, epochs=3, progress=False)

    first, second = run(), run()
    _same_training(first, second)
    assert first[1].history["train_loss"].shape == (3, 7)
    assert not torch.equal(next(first[0].parameters()),
                           next(_ensemble(names=False).parameters()))  # it trained


def test_fit_names_what_does_not_fit_the_data_contract():
    xs, y, mask = _data(n=12)
    dx, dmask = _named(xs, mask)
    rows = [{**{n: dx[n][i] for n in NAMES}, "y": y[i]} for i in range(12)]
    loader = DataLoader(rows, batch_size=5)
    model = _ensemble()
    cases = [
        ((model, loader, y), {}, ValueError, "do not pass y or mask"),
        ((model, loader), {"val_fraction": 0.2}, ValueError, "val_fraction splits tensors"),
        ((model, loader), {"seed": 1}, ValueError, "seed does not apply to a DataLoader"),
        ((model, loader), {"batch_size": 4}, ValueError, "batch_size does not apply"),
        ((model, loader), {"patience": 2}, ValueError, "patience needs validation data: give "
                                                       "val_data$"),
        ((model, (b for b in loader)), {}, TypeError, "one-shot iterator"),
        ((model, [{"text": dx["text"][:4]}]), {}, TypeError, "must be a list of modality"),
        ((model, DataLoader([{k: v for k, v in r.items() if k != "y"} for r in rows],
                            batch_size=5)), {}, ValueError, 'targets under "y"'),
        ((model, DataLoader([{**r, "label": r["y"]} for r in rows], batch_size=5)), {},
         ValueError, r"unexpected \['label'\]"),
        ((_ensemble(names=False), loader), {}, ValueError, "modalities are unnamed"),
        ((model, DataLoader([r["y"] for r in rows], batch_size=5)), {}, TypeError,
         "a batch must be a dict"),
        ((model, dx), {"mask": dmask}, ValueError, "y .* is missing"),
        ((model, dx, y[:5]), {}, ValueError, r"xs\['text'\] has 12 rows, expected n = 5"),
        ((model, xs, y), {"mask": mask[:3]}, ValueError, "mask has 3 rows, expected n = 12"),
        ((model, xs, y), {"val_data": (xs, y[:2])}, ValueError, r"val_data: xs\[0\] has 12"),
        ((model, xs, y), {"val_data": [1, 2, 3, 4]}, TypeError, "val_data must be a tuple"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            fit(*args, epochs=1, progress=False, **kwargs)
    # a model with a modality named like a reserved key must use tuple batches
    clash = SubsetEnsemble({"y": 4, "audio": 3}, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match="reserve"):
        fit(clash, DataLoader([{"y": torch.zeros(4), "audio": torch.zeros(3)}]), progress=False)
