"""The head refits keep every tensor on the device of Z and do not wait for the device inside
the solver's iterations beyond its convergence test, checked on the CPU:

* with torch's default device set to "meta", a tensor the solvers make without naming its
  device would be a meta tensor and the fit would fail (meta tensors hold no data); naming
  Z's device everywhere gives the same heads as without the default;
* reads of device data on the host (bool(), .tolist(), .item(), .nonzero(), ...) are
  counted through a TorchFunctionMode: an L-BFGS iteration whose unit step every problem
  accepts and where no problem finishes reads once.

The same fits on a GPU: tests/heads/test_heads_cuda.py."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from mmkernels import eta, heads

READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu",
         "numpy"}


class HostReads(TorchFunctionMode):
    """Logs every host read of tensor data, and "E" at each evaluation of the softmax op."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.log.append(name)
        elif name == "softmax_regression_loss_grad":
            self.log.append("E")
        return func(*args, **(kwargs or {}))


def _problem(n: int = 300, S: int = 3, H: int = 12):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(S, n, H, generator=g, dtype=torch.float64)
    y = (z[0, :, :3].sum(1) > 0).long() + (z[1, :, 3] > 0.5).long()
    return z, y


def _same(a, b) -> None:
    for name in ("coef", "intercept", "l2", "converged", "n_iter"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_fits_name_the_device_of_z_for_every_tensor_they_make() -> None:
    z, y = _problem()
    yr = z[2, :, 0] * 2 + 0.1 * z[0, :, 1]
    folds = heads.kfold(y, 3)
    runs = {
        "ridge": lambda: heads.fit(z, yr, task="regression"),
        "softmax": lambda: heads.fit(z.float(), y, task="classification", l2=0.5),
        "softmax weighted": lambda: heads.fit(z, y, task="classification",
                                              class_weight="balanced"),
        "ridge cv": lambda: heads.fit_cv(z, yr, task="regression", folds=3)[0],
        "softmax cv": lambda: heads.fit_cv(z, y, task="classification", folds=3,
                                           grid=[10.0, 1.0])[0],
        "softmax cv interleaved": lambda: heads.fit_cv(z, y, task="classification",
                                                       folds=folds, grid=[1.0])[0],
    }
    for name, run in runs.items():
        want = run()
        with torch.device("meta"):
            got = run()
        assert got.coef.device.type == "cpu", name
        _same(got, want)


def test_grouped_refit_and_its_scores_stay_on_the_device_of_z() -> None:
    z, y = _problem()
    z[1, :, 3:] = 0  # subset 1 is columns 0..2, subset 2 columns 4, 5
    z[2, :, :4], z[2, :, 6:] = 0, 0

    def train():
        return heads.GroupedZ.from_source(z, [None, [0, 1, 2], [4, 5]])

    want_z = train()
    want = heads.fit(want_z, y, task="classification")
    with torch.device("meta"):
        got_z = train()
        got = heads.fit(got_z, y, task="classification")
        risk, acc = got.risk(got_z, y), got.accuracy(got_z, y)
    assert torch.equal(risk, want.risk(want_z, y)) and torch.equal(acc, want.accuracy(want_z, y))
    for (_, a), (_, b) in zip(got.parts, want.parts, strict=True):
        _same(a, b)


def test_refit_quality_names_the_device_of_its_latents() -> None:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(120, 3, generator=g), torch.randn(120, 2, generator=g)]
    y = (xs[0][:, 0] + xs[1][:, 1] > 0).long()

    def encoder(x):  # [S = 3, n, 5]: subsets {0}, {1}, {0, 1}, zero outside their columns
        z = torch.cat(x, 1)
        keep = z.new_tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
        return torch.relu(z).unsqueeze(0) * keep.unsqueeze(1)

    def run():
        return eta.refit_quality(encoder, xs[:1] + xs[1:], y, xs, y, task="classification",
                                 subsets=[(0,), (1,), (0, 1)], l2="cv", cv_folds=3)

    want = run()
    with torch.device("meta"):
        got = run()
    assert got.rows == want.rows


def test_an_lbfgs_iteration_reads_the_device_once(monkeypatch) -> None:
    z, y = _problem()
    # The reads the solver makes on a GPU, counted on the CPU (where it reads two more flags).
    monkeypatch.setattr(heads, "_reads_are_free", lambda device: False)
    reads = HostReads()
    with reads:
        fitted = heads.fit(z, y, task="classification", l2=1.0, max_iter=30)
    # The reads between one evaluation and the next: ["tolist"] (every unit step accepted,
    # the convergence test read with it) unless problems finished (the compaction reads which)
    # or a step was halved (the backtracking reads which problems accepted).
    segments, current = [], None
    for entry in reads.log:
        if entry == "E":
            if current is not None:
                segments.append(current)
            current = []
        elif current is not None:
            current.append(entry)
    plain = [s for s in segments if "nonzero" not in s]
    assert len(plain) >= 5, segments  # most iterations are plain ones
    assert all(s == ["tolist"] for s in plain), segments
    assert int(fitted.n_iter.max()) >= len(plain)


def test_on_a_gpu_every_problem_is_solved_in_one_group() -> None:
    """The CPU solves problems in groups below PyTorch's intra-op grain (serial ops with
    several threads); on a GPU that would only multiply the launches per iteration."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert heads._softmax_group(63, 129 * 10, "cpu") < 63
        assert heads._softmax_group(63, 129 * 10, "cuda") == 63
    finally:
        torch.set_num_threads(before)
