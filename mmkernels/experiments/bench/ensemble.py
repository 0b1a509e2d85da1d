"""Benchmark: training every modality subset at once (nn.SubsetEnsemble) against the plain
PyTorch loop that trains the same subset models one after another.

    mmkernels bench ensemble [--plot PATH.png] [--out PATH.json] [--quick]

Two parts, each ratio measured in the same run on the same tensors and batch order:

1. IEMOCAP-shaped epoch: random data with dims 100/100/500, n = 13,200, batch 2048,
   H = 128, 6 classes, Adam lr 0.01, all 7 subsets, early and late fusion. Baselines:
   - "eager-masked": per subset, nn.Linear on torch.cat of the masked inputs (absent modality
     = zero block, the paper's convention; late fusion: every modality's Linear + ReLU,
     absent blocks zeroed), trained one subset after another: the loop a researcher writes;
   - "eager-present": per subset, only the subset's modalities are concatenated (early) or
     projected (late): the smallest plain model, the same FLOPs as the fused ops.
2. Scaling: time per epoch against S = 2^K - 1 for K = 4..8 modalities of width 100
   (early fusion, H = 128, 6 classes, n and batch below, smaller than IEMOCAP to stay within a
   couple of minutes); the eager-masked loop is timed up to K = ``baseline_max_k``.

"FLOP bound" = the eager runner's GEMM FLOPs over ours (:func:`gemm_gflop`): the speed-up the
skipped zero blocks alone give at equal GEMM efficiency.

Call :func:`main` (argv list) from ``mmkernels bench ensemble``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkernels.nn import SubsetEnsemble
from mmkernels.subsets import all_subsets

__all__ = ["iemocap_epoch", "scaling", "main"]


class _EagerModel(nn.Module):
    """One subset's model, written the plain way: masked (or present-only) cat + nn.Linear."""

    def __init__(self, dims: Sequence[int], subset: Sequence[int], hidden: int, classes: int,
                 fusion: str, present_only: bool) -> None:
        super().__init__()
        self.subset, self.fusion, self.present_only = tuple(subset), fusion, present_only
        used = [k for k in range(len(dims)) if present_only is False or k in self.subset]
        self.used = used
        if fusion == "early":
            self.enc = nn.Linear(sum(dims[k] for k in used), hidden)
            latent = hidden
        else:
            self.encs = nn.ModuleList([nn.Linear(dims[k], hidden) for k in used])
            latent = hidden * len(used)
        self.head = nn.Linear(latent, classes)

    def forward(self, xs: Sequence[Tensor]) -> Tensor:
        if self.fusion == "early":
            blocks = [xs[k] if k in self.subset else torch.zeros_like(xs[k]) for k in self.used]
            z = torch.relu(self.enc(torch.cat(blocks, dim=1)))
        else:
            outs = []
            for k, lin in zip(self.used, self.encs, strict=True):
                y = torch.relu(lin(xs[k]))
                outs.append(y if k in self.subset else torch.zeros_like(y))
            z = torch.cat(outs, dim=1)
        return self.head(z)


def _time(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn: one warm-up call each, then ``repeats`` rounds that call every
    fn once in turn (interleaved, so a change of machine load hits every runner alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _ensemble_epoch(model: SubsetEnsemble, xs: list[Tensor], y: Tensor,
                    batches: list[Tensor], opt: torch.optim.Optimizer) -> None:
    for idx in batches:
        xb = [x[idx] for x in xs]
        opt.zero_grad(set_to_none=True)
        model.losses(model(xb), y[idx]).sum().backward()
        opt.step()


def _eager_epoch(models: list[nn.Module], opts: list[torch.optim.Optimizer], xs: list[Tensor],
                 y: Tensor, batches: list[Tensor]) -> None:
    for m, opt in zip(models, opts, strict=True):  # one subset after another
        for idx in batches:
            xb = [x[idx] for x in xs]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(xb), y[idx]).backward()
            opt.step()


def _setup(dims: Sequence[int], n: int, batch: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g) for d in dims]
    y = torch.randint(0, classes, (n,), generator=g)
    batches = list(torch.randperm(n, generator=g).split(batch))
    return xs, y, batches


def gemm_gflop(dims: Sequence[int], subsets: Sequence[Sequence[int]], n: int, hidden: int,
               classes: int, fusion: str, runner: str) -> float:
    """GEMM GFLOP of one training epoch: forward plus weight-gradient backward (the inputs need
    no gradient), encoders and heads. "mmkernels" and "eager-present" touch only the subset's
    modalities; "eager-masked" multiplies the zero blocks too (early: all of D; late: every
    modality's Linear). The ratio of two runners' GFLOP bounds the speed-up from FLOPs alone."""
    total = 0.0
    for sub in subsets:
        used = range(len(dims)) if runner == "eager-masked" else sub
        d_in = sum(dims[k] for k in used)
        enc = 2.0 * n * d_in * hidden
        latent = hidden if fusion == "early" else hidden * (
            len(dims) if runner != "eager-present" else len(sub))
        total += 2 * (enc + 2.0 * n * latent * classes)  # forward + weight gradient
        total += 2.0 * n * latent * classes  # the head's input gradient
    return total / 1e9


def iemocap_epoch(
    fusion: str, *, dims: Sequence[int] = (100, 100, 500), n: int = 13200, batch: int = 2048,
    hidden: int = 128, classes: int = 6, lr: float = 0.01, repeats: int = 3, seed: int = 0,
) -> dict:
    """Seconds per training epoch of all 7 subsets: fused ensemble vs the eager loops."""
    xs, y, batches = _setup(dims, n, batch, classes, seed)
    subsets = all_subsets(len(dims))
    ens = SubsetEnsemble(list(dims), hidden, classes, fusion=fusion, seed=seed)
    opt = torch.optim.Adam(ens.parameters(), lr=lr)
    result = {"fusion": fusion, "S": len(subsets), "n": n, "batch": batch, "hidden": hidden,
              "seconds": {}}
    fns: dict[str, Callable[[], None]] = {
        "mmkernels": lambda: _ensemble_epoch(ens, xs, y, batches, opt)}
    for name, present_only in (("eager-masked", False), ("eager-present", True)):
        models = [_EagerModel(dims, s, hidden, classes, fusion, present_only) for s in subsets]
        opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in models]
        fns[name] = lambda m=models, o=opts: _eager_epoch(m, o, xs, y, batches)
    result["seconds"] = _time(fns, repeats)
    ours = result["seconds"]["mmkernels"]
    result["speedup"] = {k: v / ours for k, v in result["seconds"].items()}
    result["gflop"] = {k: gemm_gflop(dims, subsets, n, hidden, classes, fusion, k)
                       for k in result["seconds"]}
    result["flop_bound"] = {k: g / result["gflop"]["mmkernels"] for k, g in
                            result["gflop"].items()}
    return result


def scaling(
    ks: Sequence[int] = (4, 5, 6, 7, 8), *, dim: int = 100, n: int = 2048, batch: int = 512,
    hidden: int = 128, classes: int = 6, baseline_max_k: int = 6, repeats: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Seconds per epoch against S = 2^K - 1 (early fusion, every subset of K modalities)."""
    rows = []
    for k in ks:
        dims = [dim] * k
        xs, y, batches = _setup(dims, n, batch, classes, seed)
        subsets = all_subsets(k)
        ens = SubsetEnsemble(dims, hidden, classes, fusion="early", seed=seed)
        opt = torch.optim.Adam(ens.parameters(), lr=0.01)
        fns: dict[str, Callable[[], None]] = {
            "mmkernels": lambda e=ens, o=opt, x=xs, t=y, b=batches: _ensemble_epoch(e, x, t, b, o)
        }
        if k <= baseline_max_k:
            models = [_EagerModel(dims, s, hidden, classes, "early", False) for s in subsets]
            opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in models]
            fns["eager-masked"] = lambda m=models, o=opts, x=xs, t=y, b=batches: _eager_epoch(
                m, o, x, t, b)
        row: dict = {"K": k, "S": len(subsets), **_time(fns, repeats)}
        row["gflop"] = gemm_gflop(dims, subsets, n, hidden, classes, "early", "mmkernels")
        row["flop_bound"] = gemm_gflop(dims, subsets, n, hidden, classes, "early",
                                       "eager-masked") / row["gflop"]
        if "eager-masked" in row:
            row["speedup"] = row["eager-masked"] / row["mmkernels"]
        rows.append(row)
        print(_scaling_line(row), flush=True)
    return rows


def _scaling_line(row: dict) -> str:
    base = f"{row['eager-masked']:12.3f} {row['speedup']:8.2f}x" if "speedup" in row else \
        f"{'-':>12} {'-':>9}"
    per = row["mmkernels"] / row["S"] * 1e3
    rate = row["gflop"] / row["mmkernels"]
    return (f"{row['K']:3d} {row['S']:5d} {row['mmkernels']:12.3f} {per:12.2f} {rate:9.1f} "
            f"{base} {row['flop_bound']:9.2f}x")


def plot_scaling(rows: list[dict], path: Path) -> None:
    """PNG: seconds per epoch against S (log-log), fused ensemble and eager loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    s = [r["S"] for r in rows]
    ax.plot(s, [r["mmkernels"] for r in rows], "o-", label="SubsetEnsemble (fused ops)")
    base = [r for r in rows if "eager-masked" in r]
    if base:
        ax.plot([r["S"] for r in base], [r["eager-masked"] for r in base], "s--",
                label="eager loop over subsets")
    for r in rows:
        ax.annotate(f"K={r['K']}", (r["S"], r["mmkernels"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(s, [str(v) for v in s])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("subsets trained, S = 2^K - 1")
    ax.set_ylabel("seconds per epoch")
    ax.set_title("Training all subsets: cost against S (CPU)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmkernels bench ensemble",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", type=Path, default=Path("bench-results/ensemble_scaling.png"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/ensemble_cpu.json"))
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs (median)")
    parser.add_argument("--scaling-n", type=int, default=2048)
    parser.add_argument("--scaling-batch", type=int, default=512)
    parser.add_argument("--baseline-max-k", type=int, default=6)
    parser.add_argument("--parts", nargs="+", default=["iemocap", "scaling"],
                        choices=["iemocap", "scaling"], help="which parts to run")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    args = parser.parse_args(argv)
    machine = f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    results: dict = {"machine": machine, "iemocap": [], "scaling": []}
    print(f"# {machine}")
    kw = {"n": 256, "batch": 128} if args.quick else {"n": 13200, "batch": 2048}
    print(f"# one epoch, all 7 subsets, IEMOCAP-shaped random data (100/100/500, n={kw['n']}, "
          f"batch {kw['batch']}, H=128, 6 classes, Adam lr 0.01), float32; median of "
          f"{args.repeats} epochs, runners interleaved")
    print(f"{'fusion':7} {'runner':14} {'s/epoch':>9} {'speed-up':>9} {'target':>7}      "
          f"{'GFLOP':>6} {'GFLOP/s':>8} {'FLOP bound':>10}")
    for fusion in ("early", "late") if "iemocap" in args.parts else ():
        r = iemocap_epoch(fusion, repeats=args.repeats, **kw)
        results["iemocap"].append(r)
        for name, sec in r["seconds"].items():
            target = "" if name == "mmkernels" else "4.0x"
            ok = "" if name == "mmkernels" else ("ok" if r["speedup"][name] >= 4 else "MISS")
            gf = r["gflop"][name]
            print(f"{fusion:7} {name:14} {sec:9.3f} {r['speedup'][name]:8.2f}x {target:>7} "
                  f"{ok:4} {gf:6.1f} {gf / sec:8.1f} {r['flop_bound'][name]:9.2f}x", flush=True)
    ks = (4, 5) if args.quick else (4, 5, 6, 7, 8)
    n, batch = (128, 64) if args.quick else (args.scaling_n, args.scaling_batch)
    print(f"\n# scaling: early fusion, K modalities of width 100, all S = 2^K - 1 subsets, "
          f"n={n}, batch {batch}, H=128, 6 classes; one warm-up and one timed epoch each, "
          "interleaved")
    print(f"{'K':>3} {'S':>5} {'s/epoch':>12} {'ms/subset':>12} {'GFLOP/s':>9} "
          f"{'eager s/ep':>12} {'speed-up':>9} {'FLOP bound':>10}")
    if "scaling" in args.parts:
        results["scaling"] = scaling(ks, n=n, batch=batch, baseline_max_k=args.baseline_max_k)
        plot_scaling(results["scaling"], args.plot)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"# wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
