"""The head-refit ops and the refits themselves on a GPU (skipped without one; run by
scripts/gpu_check.sh): the CUDA kernels of mmkernels::gram,
mmkernels::softmax_regression_loss_grad and mmkernels::lbfgs_direction against float64 plain
PyTorch (tests/oracle.py's rule; the direction within its dtype's tolerance) with outputs
poisoned beforehand, opcheck, run-to-run determinism, CUDA graph capture (no host sync in an op
call); heads.fit, heads.fit_cv, eta.refit_quality and a sweep cell with every tensor on the
GPU, against the same on the CPU. Without a GPU the kernels run through the host emulator in
tests/heads/test_heads_cuda_emulated.py."""

from __future__ import annotations

import pytest
import torch
from oracle import assert_matches_oracle
from test_heads_cuda_emulated import (
    ACC,
    _gram_reference,
    _lbfgs_inputs,
    _softmax_reference,
    assert_lbfgs_matches_reference,
)

from mmkernels import eta, heads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ops = torch.ops.mmkernels


def poison_allocator() -> None:
    """Leave NaN in the blocks the caching allocator hands out next."""
    for numel in (1 << 12, 1 << 16, 1 << 20, 1 << 24):
        torch.full((numel,), float("nan"), device="cuda")
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", list(ACC))
@pytest.mark.parametrize("S, n, H, T", [(1, 1, 1, None), (3, 1000, 63, 2), (7, 4099, 130, None),
                                        (2, 50_000, 64, 3)])
def test_gram_on_cuda_matches_reference(dtype, S, n, H, T) -> None:
    g = torch.Generator(device="cuda").manual_seed(S * n + H)
    wide = torch.randn(S, n, H + 2, device="cuda", generator=g).to(dtype)
    z = wide[:, :, 1:H + 1]  # an odd row stride
    y = torch.randn(n, *([] if T is None else [T]), device="cuda", generator=g).to(ACC[dtype])
    poison_allocator()
    G, R = ops.gram(z, y)
    y2 = y.unsqueeze(1) if y.dim() == 1 else y
    same = _gram_reference(z.cpu(), y2.cpu(), ACC[dtype])
    oracle = _gram_reference(z.cpu().double(), y2.cpu().double(), torch.float64)
    for name, ours, s, o in zip(("G", "R"), (G, R), same, oracle, strict=True):
        assert ours.device.type == "cuda"
        assert_matches_oracle(ours.cpu(), s, o, f"gram {name} (cuda)", n)
    assert torch.equal(G, G.transpose(1, 2))


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float64),
                                    (torch.float32, torch.float64)])
@pytest.mark.parametrize("S, n, H, C, pick", [(1, 1, 1, 1, None), (3, 1000, 37, 10, [2, 0, 2]),
                                              (7, 20_000, 128, 6, None),
                                              (2, 3000, 20, 300, [1])])
def test_softmax_on_cuda_matches_reference(dtypes, S, n, H, C, pick) -> None:
    zdt, acc = dtypes
    g = torch.Generator(device="cuda").manual_seed(S * n + H + C)
    z = torch.randn(S, n, H, device="cuda", generator=g).to(zdt)
    index = None if pick is None else torch.tensor(pick, device="cuda")
    K = S if index is None else len(pick)
    y = torch.randint(0, C, (n,), device="cuda", generator=g)
    w = (0.3 * torch.randn(K, H, C, device="cuda", generator=g)).to(acc)
    b = torch.randn(K, C, device="cuda", generator=g).to(acc)
    sw = torch.rand(n, device="cuda", generator=g).to(acc)
    poison_allocator()
    got = ops.softmax_regression_loss_grad(z, y, w, b, sw, 0.7, index)
    cpu = [t.cpu() for t in (z, y, w, b, sw)] + [None if index is None else index.cpu()]
    same = _softmax_reference(*cpu[:5], 0.7, cpu[5], acc)
    oracle = _softmax_reference(cpu[0].double(), *cpu[1:5], 0.7, cpu[5], torch.float64)
    for name, ours, s, o in zip(("loss", "grad_w", "grad_b"), got, same, oracle, strict=True):
        assert_matches_oracle(ours.cpu(), s, o, f"softmax {name} (cuda)", max(n, H, C))


def _softmax_args(device="cuda"):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3000, 33, generator=g).to(device)
    y = torch.randint(0, 5, (3000,), generator=g).to(device)
    w, b = 0.1 * torch.randn(2, 33, 5, generator=g), torch.randn(2, 5, generator=g)
    return z, y, w.to(device), b.to(device), None, 0.5, torch.tensor([3, 1], device=device)


def test_opcheck_on_cuda() -> None:
    z, y, w, b, sw, l2, index = _softmax_args()
    torch.library.opcheck(ops.softmax_regression_loss_grad, (z, y, w, b, sw, l2, index))
    torch.library.opcheck(ops.gram, (z, y.float()))


def test_head_ops_are_deterministic_and_capture_in_a_cuda_graph() -> None:
    args = _softmax_args()
    z = args[0]
    yf = torch.randn(z.shape[1], 2, device="cuda")

    def step():
        return (*ops.softmax_regression_loss_grad(*args), *ops.gram(z, yf))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        first = step()
    torch.cuda.current_stream().wait_stream(side)
    assert all(torch.equal(a, c) for a, c in zip(first, step(), strict=True))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    z.normal_()
    graph.replay()
    fresh = step()
    torch.cuda.synchronize()
    assert all(torch.equal(a, c) for a, c in zip(captured, fresh, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("k, P, m, with_diag", [
    (1, 1, 0, False), (0, 5, 3, True), (7, 774, 10, True),
    (100, 5130, 10, False),   # the softmax CV's size
    (2, 100_003, 40, True),   # long rows, two launches each way
    (3000, 9, 70, False),     # many short problems, three chunks
])
def test_lbfgs_direction_on_cuda_matches_reference(dtype, k, P, m, with_diag) -> None:
    args = _lbfgs_inputs(k + P + m, k, P, m, dtype, with_diag, device="cuda")
    poison_allocator()
    got = ops.lbfgs_direction(*args)
    assert got.device.type == "cuda" and got.is_contiguous()
    assert_lbfgs_matches_reference(got, args, f"lbfgs_direction k={k} P={P} m={m} (cuda)")


def test_lbfgs_direction_on_cuda_reads_strided_inputs() -> None:
    grad, s, y, rho, gamma, diag = _lbfgs_inputs(1, 5, 300, 35, torch.float64, True, "cuda")
    wide = torch.full((5, 303), float("nan"), dtype=grad.dtype, device="cuda")
    wide[:, 1:301] = grad
    s_t = [sj.t().contiguous().t() for sj in s]  # P-major storage
    rho_s = [torch.stack([r, torch.full_like(r, float("nan"))], 1)[:, 0] for r in rho]
    gamma_s = torch.stack([gamma, gamma], 1)[:, 1]
    got = ops.lbfgs_direction(wide[:, 1:301], s_t, y, rho_s, gamma_s, diag.t().contiguous().t())
    assert torch.equal(got, ops.lbfgs_direction(grad, s, y, rho, gamma, diag))
    assert_lbfgs_matches_reference(got, (grad, s, y, rho, gamma, diag), "strided (cuda)")


@pytest.mark.parametrize("m", [3, 40])
def test_lbfgs_direction_on_cuda_reads_rows(m) -> None:
    grad, s, y, rho, gamma, diag = _lbfgs_inputs(3, 9, 700, m, torch.float64, True, "cuda")
    gen = torch.Generator().manual_seed(m)
    rows = torch.stack([torch.randperm(9, generator=gen)[:5] for _ in range(m)]).cuda()
    got = ops.lbfgs_direction(grad[:5], s, y, rho, gamma[:5], diag[:5], rows)
    picked = [[t.index_select(0, r) for t, r in zip(ts, rows, strict=True)] for ts in (s, y, rho)]
    assert_lbfgs_matches_reference(got, (grad[:5], *picked, gamma[:5], diag[:5]), "rows (cuda)")
    rows[0, 1] = -1  # out of range: a NaN direction for that problem, no error, no sync
    got = ops.lbfgs_direction(grad[:5], s, y, rho, gamma[:5], diag[:5], rows)
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2, 3, 4]]).all()


def test_lbfgs_direction_is_deterministic_and_captures_in_a_cuda_graph() -> None:
    args = _lbfgs_inputs(2, 6, 2000, 40, torch.float32, True, "cuda")
    grad = args[0]
    torch.library.opcheck(ops.lbfgs_direction, args)
    torch.library.opcheck(ops.lbfgs_direction, (grad, [], [], [], args[4], None))
    first = ops.lbfgs_direction(*args)
    assert torch.equal(first, ops.lbfgs_direction(*args))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.lbfgs_direction(*args)
    grad.normal_()
    graph.replay()
    fresh = ops.lbfgs_direction(*args)
    torch.cuda.synchronize()
    assert torch.equal(captured, fresh)


def test_too_many_classes_is_a_clear_error_on_cuda() -> None:
    z, y = torch.randn(1, 3, 2, device="cuda"), torch.zeros(3, dtype=torch.int64, device="cuda")
    w, b = torch.zeros(1, 2, 20000, device="cuda"), torch.zeros(1, 20000, device="cuda")
    with pytest.raises(ValueError, match="classes in Float on CUDA"):
        ops.softmax_regression_loss_grad(z, y, w, b, None, 0.0)


def _latents(n=4000, S=7, H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(S, n, H, generator=g)
    y = (z[0, :, :3].sum(1) > 0).long() + (z[1, :, 3] > 0.5).long()
    return z, y


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_fit_with_every_tensor_on_the_gpu_matches_the_cpu(task) -> None:
    z, y = _latents()
    if task == "regression":
        y = z[2, :, 0] * 2 + 0.1 * torch.randn(z.shape[1])
    on_cpu = heads.fit(z, y, task=task, l2=1.0)
    on_gpu = heads.fit(z.cuda(), y.cuda(), task=task, l2=1.0)
    for name in ("coef", "intercept"):
        got = getattr(on_gpu, name)
        assert got.device.type == "cuda", name
        torch.testing.assert_close(got.cpu(), getattr(on_cpu, name), rtol=1e-3, atol=1e-3)
    risk = on_gpu.risk(z.cuda(), y.cuda())
    assert risk.device.type == "cuda"
    torch.testing.assert_close(risk.cpu(), on_cpu.risk(z, y), rtol=1e-4, atol=1e-5)


def test_fit_cv_and_refit_quality_on_the_gpu() -> None:
    z, y = _latents(n=2000, S=3, H=8)
    heads_gpu, search = heads.fit_cv(z.cuda(), y.cuda(), task="classification", folds=3,
                                     grid=[10.0, 1.0])
    heads_cpu, search_cpu = heads.fit_cv(z, y, task="classification", folds=3, grid=[10.0, 1.0])
    assert heads_gpu.coef.device.type == "cuda" and search.score.device.type == "cuda"
    torch.testing.assert_close(search.score.cpu(), search_cpu.score, rtol=1e-3, atol=1e-4)
    xs = [torch.randn(500, 3), torch.randn(500, 2)]
    yy = (xs[0][:, 0] + xs[1][:, 1] > 0).long()

    def encoder(x):
        zz = torch.cat(x, 1)
        keep = zz.new_tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
        return torch.relu(zz).unsqueeze(0) * keep.unsqueeze(1)

    kw = dict(task="classification", subsets=[(0,), (1,), (0, 1)], l2="cv", cv_folds=3)
    gpu = eta.refit_quality(encoder, [x.cuda() for x in xs], yy.cuda(),
                            [x.cuda() for x in xs], yy.cuda(), **kw)
    cpu = eta.refit_quality(encoder, xs, yy, xs, yy, **kw)
    for a, c in zip(gpu.rows, cpu.rows, strict=True):
        assert a["subset"] == c["subset"]
        assert a["test_risk"] == pytest.approx(c["test_risk"], rel=1e-3, abs=1e-4)


def test_a_sweep_cell_runs_on_the_gpu() -> None:
    import numpy as np

    from mmkernels.experiments import sweep as sw
    from mmkernels.experiments.data import MultiModalDataset

    rng = np.random.default_rng(0)
    labels = np.arange(200) % 3
    mods = {name: (rng.normal(size=(3, 4))[labels] * 2 + rng.normal(size=(200, 4)))
            .astype(np.float32) for name in ("text", "audio")}
    split = np.where(np.arange(200) < 140, "train", "test")
    data = sw.prepare(MultiModalDataset(mods, labels, task="classification", split=split),
                      "tiny")
    cfg = sw.SweepConfig(hidden=8, epochs=2, seeds=[0], fractions=[1.0], probe=True)
    gpu = sw.run_cell(data, 0, 1.0, cfg, device="cuda")
    cpu = sw.run_cell(data, 0, 1.0, cfg, device="cpu")
    assert not gpu["diverged"] and len(gpu["refit"]) == len(cpu["refit"]) > 0
    for a, c in zip(gpu["subsets"], cpu["subsets"], strict=True):
        assert a["test_loss"] == pytest.approx(c["test_loss"], rel=1e-3, abs=1e-3)
