"""GPU benchmark of the head refits (issue 16, target d): heads.fit of the softmax heads of
S = 63 subsets (n = 100,000, H = 128, C = 10, bfloat16 Z on the GPU) against

* scikit-learn's LogisticRegression looped over the subsets on the CPU (measured on
  `sk_subsets` of them and scaled to S: the loop's fits are independent, so its time is
  linear in S; the scaling is stated with the figure), and
* the same batched L-BFGS (mmkernels.heads) with each evaluation written in plain PyTorch on
  the GPU (baddbmm, log_softmax, bmm on float32 Z) instead of the fused kernel,

and the ridge refit of the same Z (mmkernels::gram) against the Gram built by torch.bmm. The
runners are interleaved, each timed `repeats` times after one warm-up call; medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from mmkernels import heads

L2 = 1.0


def plain_softmax_loss_grad(z: Tensor, y: Tensor, w: Tensor, b: Tensor, sw: Tensor | None,
                            l2: float, subset_index: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """mmkernels::softmax_regression_loss_grad in plain PyTorch (same outputs)."""
    zs = (z if subset_index is None else z.index_select(0, subset_index)).to(w.dtype)
    K, n = zs.shape[:2]
    logp = torch.baddbmm(b.unsqueeze(1), zs, w).log_softmax(2)
    picked = logp.gather(2, y.view(1, n, 1).expand(K, n, 1)).squeeze(2)
    weight = torch.ones(n, dtype=w.dtype, device=w.device) if sw is None else sw.to(w.dtype)
    d = logp.exp_()
    d.scatter_add_(2, y.view(1, n, 1).expand(K, n, 1),
                   torch.full((K, n, 1), -1.0, dtype=w.dtype, device=w.device))
    d.mul_(weight.view(1, n, 1))
    loss = -(picked * weight).sum(1) + 0.5 * l2 * w.square().sum((1, 2))
    return loss, torch.bmm(zs.transpose(1, 2), d) + l2 * w, d.sum(1)


class _PlainOps:
    """torch.ops.mmkernels as heads.py calls it, with the softmax op in plain PyTorch."""

    softmax_regression_loss_grad = staticmethod(plain_softmax_loss_grad)

    def __getattr__(self, name: str):
        return getattr(torch.ops.mmkernels, name)


@contextmanager
def plain_pytorch_evaluations() -> Iterator[None]:
    saved = heads._ops
    heads._ops = _PlainOps()
    try:
        yield
    finally:
        heads._ops = saved


def _plain_ridge_grams(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    a = torch.cat([z.float(), torch.ones(*z.shape[:2], 1, device=z.device)], 2)
    return torch.bmm(a.transpose(1, 2), a), torch.bmm(a.transpose(1, 2),
                                                      y.float().view(1, -1, 1).expand(
                                                          z.shape[0], -1, 1))


def _timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def refit_data(S: int, n: int, H: int, C: int, dtype: torch.dtype, seed: int = 0):
    """Z [S, n, H] on the GPU with a subset-dependent class signal, labels [n]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randint(0, C, (n,), device="cuda", generator=g)
    scale = torch.linspace(0.05, 0.25, S, device="cuda")[:, None, None]
    means = torch.randn(S, C, H, device="cuda", generator=g) * scale
    z = torch.randn(S, n, H, device="cuda", generator=g, dtype=dtype)
    z += means[:, y].to(dtype)
    return z, y


def run_refit(scale: float = 1.0, repeats: int = 3, sk_subsets: int = 2) -> list[dict]:
    """Target d (softmax) and the ridge refit; rows of (case, runner, median s, speed-up)."""
    from sklearn.linear_model import LogisticRegression

    S, n, H, C = 63, int(100_000 * scale), 128, 10
    z, y = refit_data(S, n, H, C, torch.bfloat16)

    def ours():
        return heads.fit(z, y, task="classification", l2=L2)

    def plain():
        with plain_pytorch_evaluations():
            return heads.fit(z, y, task="classification", l2=L2)

    fitted, reference = ours(), plain()  # the warm-up calls
    times: dict[str, list[float]] = {"mmkernels": [], "plain PyTorch L-BFGS (GPU)": []}
    for _ in range(repeats):
        times["mmkernels"].append(_timed(ours))
        times["plain PyTorch L-BFGS (GPU)"].append(_timed(plain))
    zs, ys = z[:sk_subsets].float().cpu().numpy(), y.cpu().numpy()
    start = time.perf_counter()
    for s in range(sk_subsets):
        LogisticRegression(C=1.0 / L2, max_iter=1000).fit(zs[s], ys)
    sk = (time.perf_counter() - start) * S / sk_subsets
    ours_s = statistics.median(times["mmkernels"])
    risk_gap = (fitted.risk(z, y) - reference.risk(z, y)).abs().max().item()
    rows = [{"case": "d_softmax_refit", "runner": "mmkernels", "median_s": ours_s,
             "speedup": 1.0, "target": None, "iterations": int(fitted.n_iter.max())}]
    rows.append({"case": "d_softmax_refit", "runner": "plain PyTorch L-BFGS (GPU)",
                 "median_s": statistics.median(times["plain PyTorch L-BFGS (GPU)"]),
                 "target": 3.0, "max_risk_difference": risk_gap})
    rows.append({"case": "d_softmax_refit", "runner": "scikit-learn loop (CPU)",
                 "median_s": sk, "target": 20.0,
                 "note": f"measured on {sk_subsets} of the {S} subsets, scaled by {S}/"
                         f"{sk_subsets} (independent fits); {torch.get_num_threads()} threads"})
    # The ridge refit of the same Z: the Gram kernel against torch.bmm's.
    yr = z[0, :, 0].float() + 0.1 * torch.randn(n, device="cuda")
    ridge: dict[str, list[float]] = {"mmkernels": [], "Gram by torch.bmm": []}
    heads.fit(z, yr, task="regression", l2=L2)
    _plain_ridge_grams(z, yr)
    for _ in range(repeats):
        ridge["mmkernels"].append(_timed(lambda: heads.fit(z, yr, task="regression", l2=L2)))
        ridge["Gram by torch.bmm"].append(_timed(lambda: _plain_ridge_grams(z, yr)))
    rmine = statistics.median(ridge["mmkernels"])
    rows.append({"case": "ridge_refit", "runner": "mmkernels", "median_s": rmine,
                 "speedup": 1.0, "target": None})
    rows.append({"case": "ridge_refit", "runner": "Gram by torch.bmm",
                 "median_s": statistics.median(ridge["Gram by torch.bmm"]), "target": None,
                 "note": "the Gram alone (no solve), float32 copy of Z"})
    for row in rows:
        base = ours_s if row["case"] == "d_softmax_refit" else rmine
        row["speedup"] = row["median_s"] / base
        tgt = row.get("target")
        ok = "" if tgt is None else ("ok" if row["speedup"] >= tgt else "MISS")
        print(f"{row['case']:32} {row['runner']:28} {row['median_s'] * 1e3:10.1f} ms "
              f"{row['speedup']:7.2f}x {'' if tgt is None else f'{tgt:.0f}x':>5} {ok}")
        if "note" in row:
            print(f"{'':32} note: {row['note']}")
    return rows
