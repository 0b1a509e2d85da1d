"""Head-refit benchmarks: mmkernels.heads.fit against scikit-learn Ridge / LogisticRegression
looped over the subsets (docs/design.md, "Baselines every benchmark names").

    mmkernels bench heads [--scale 1.0] [--only ridge] [--threads N] [--out PATH]

Cases (float32 Z unless stated; the data are synthetic with a subset-dependent signal):
  a. ridge   S=15,  n=7000,  H=128, T=1  ; agreement: test MSE in float64, relative
  b. softmax S=7,   n=13200, H=128, C=6  ; agreement: test accuracy (points) and objective
                                            (relative, both solutions scored by the same op)
  c. ridge and softmax at S=255, n=2000, H=64 (C=6): time and peak memory
  d. the softmax op alone on a cross-validation's calls (softmax_group_rates): 20 problems on
     1,120 rows, C = 10, H = 128 and 512, on 20 different subsets (the per-problem kernel)
     against 4 problems on each of 5 subsets side by side (the grouped kernel), in GFLOP/s
     (4 n H C per problem) against MKL's sgemm with N = 10 and N = 40 columns (torch.mm)
  e. the solvers' L-BFGS direction alone at the CV's largest group (100 problems of
     P = 5130 float64, 10 pairs): mmkernels::lbfgs_direction against the same recursion as
     in-place tensor ops, in GB/s of the history, with one torch.sum pass over it as the floor
Ridge is bound by its Gram matrices, so the ridge cases also state the Gram op's rate as a
fraction of the machine's GEMM rate, both measured in the same run: the op's GEMM flops
(2 S n H (H + T)) over its time, against MKL's float32 sgemm (torch.mm) of two square matrices
of the same flop count, and against the same GEMMs issued by ATen (torch.bmm of Z^T Z, Z^T Y);
the whole fit's rate (the same flops over the fit's time) is given against the sgemm too.
Both sides use the same penalty: Ridge(alpha=l2); LogisticRegression(C=1/l2) (C > 2 classes).
sklearn runs with its default tol (1e-4 on the mean-scaled gradient), as do we for float32.
Peak memory is the growth of the process's peak RSS during the call (Linux clear_refs), so it
counts torch and numpy allocations alike; Z itself exists before and is not counted.
Each runner runs `repeats` times (default 1: the sklearn loops take seconds; ours gets one
warm-up call first), the runners interleaved with a 0.5 s pause before each timed call; the
median is shown. Both run with torch's / numpy's default thread counts (heads.fit does not
change them).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from mmkernels import heads
from mmkernels.experiments.bench.timing import machine

__all__ = ["HeadsCase", "heads_cases", "run_heads", "main"]

L2 = 1.0
SETTLE_S = 0.5  # pause before each timed call (see run_heads)


@dataclass
class HeadsCase:
    name: str
    shapes: dict
    runners: dict[str, Callable[[], object]]          # "mmkernels" first, then baselines
    targets: dict[str, float] = field(default_factory=dict)   # minimum speed-up per baseline
    check: Callable[[], dict[str, float]] | None = None        # agreement figures
    gram_inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # ridge: (Z, y) of the fit


def _peak_rss_growth_mb(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, growth of peak RSS in MB) of one call."""
    def rss(field_name: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name):
                    return int(line.split()[1])
        return 0
    try:
        # Return freed heap pages to the OS first, so that reused memory counts as growth.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = rss("VmRSS:")
    except OSError:
        base = -1
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    grown = (rss("VmHWM:") - base) / 1024 if base >= 0 else float("nan")
    return ms, grown


def _regression_data(S: int, n: int, H: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    ntest = max(n // 4, 10)
    base = torch.randn(n + ntest, H, generator=g)
    y = base @ (torch.randn(H, generator=g) / H**0.5) + 0.5 * torch.randn(n + ntest, generator=g)
    # Subset s sees the signal's features mixed with noise, more of the signal as s grows; a
    # non-zero mean exercises the intercept.
    mix = torch.linspace(0.2, 1.0, S)[:, None, None]
    z = mix * base + (1 - mix**2).sqrt() * torch.randn(S, n + ntest, H, generator=g) + 0.1
    return (z[:, :n].to(dtype).contiguous(), y[:n].to(dtype), z[:, n:].to(dtype).contiguous(),
            y[n:].to(dtype))


def _classification_data(S: int, n: int, H: int, C: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    ntest = max(n // 4, 10)
    y = torch.randint(0, C, (n + ntest,), generator=g)
    means = torch.randn(S, C, H, generator=g) * torch.linspace(0.05, 0.25, S)[:, None, None]
    z = torch.randn(S, n + ntest, H, generator=g) + means[:, y]
    return (z[:, :n].to(dtype).contiguous(), y[:n], z[:, n:].to(dtype).contiguous(), y[n:])


def _sk_ridge_loop(z: torch.Tensor, y: torch.Tensor) -> list:
    zn, yn = z.numpy(), y.numpy()
    return [Ridge(alpha=L2).fit(zn[s], yn) for s in range(zn.shape[0])]


def _sk_logistic_loop(z: torch.Tensor, y: torch.Tensor) -> list:
    zn, yn = z.numpy(), y.numpy()
    return [LogisticRegression(C=1.0 / L2, max_iter=1000).fit(zn[s], yn)
            for s in range(zn.shape[0])]


def _ridge_case(name: str, S: int, n: int, H: int, check: bool) -> HeadsCase:
    ztr, ytr, zte, yte = _regression_data(S, n, H, 0, torch.float32)

    def agreement() -> dict[str, float]:
        zd, yd, zt, yt = ztr.double(), ytr.double(), zte.double(), yte.double()
        ours = heads.fit(zd, yd, task="regression", l2=L2).risk(zt, yt).numpy()
        refs = _sk_ridge_loop(zd, yd)
        theirs = np.array([((r.predict(zt[s].numpy()) - yt.numpy()) ** 2).mean()
                           for s, r in enumerate(refs)])
        return {"test_mse_max_rel_diff_f64": float(np.max(np.abs(ours - theirs) / theirs))}

    return HeadsCase(
        name, {"S": S, "n": n, "H": H, "T": 1, "dtype": "float32"},
        {"mmkernels": lambda: heads.fit(ztr, ytr, task="regression", l2=L2),
         "sklearn_loop": lambda: _sk_ridge_loop(ztr, ytr)},
        {}, agreement if check else None, gram_inputs=(ztr, ytr))


def gram_flops(S: int, n: int, H: int, T: int) -> float:
    """Flops of the GEMMs of the Gram op: Z_s^T Z_s and Z_s^T Y for each of S subsets."""
    return 2.0 * S * n * H * (H + T)


def gemm_rates(z: torch.Tensor, y: torch.Tensor, rounds: int) -> dict[str, float]:
    """GFLOP/s of the Gram op, of the same GEMMs in ATen, and of a square sgemm of the same
    flop count: medians of `rounds` calls each, the three interleaved call by call."""
    S, n, H = z.shape
    y2 = y.reshape(n, -1)
    flops = gram_flops(S, n, H, y2.shape[1])
    side = max(1, round((flops / 2) ** (1 / 3)))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(side, side, generator=g), torch.randn(side, side, generator=g)
    zt = z.transpose(1, 2)
    runners = {
        "gram_op": (flops, lambda: torch.ops.mmkernels.gram(z, y)),
        "aten_same_gemms": (flops, lambda: (torch.bmm(zt, z), torch.matmul(zt, y2))),
        "sgemm_square": (2.0 * side**3, lambda: torch.mm(a, b)),
    }
    rates = _interleaved_rates(runners, rounds)
    rates["gram_gflop"] = flops / 1e9
    rates["sgemm_side"] = float(side)
    return rates


def softmax_group_rates(H: int, rounds: int, n: int = 1120, C: int = 10, problems: int = 20,
                        per_subset: int = 4) -> dict[str, float]:
    """GFLOP/s of the softmax op on `problems` problems over n rows (4 n H C flops each: the
    logits and the gradient): each on its own subset, and per_subset of them on each subset
    next to each other (as the CV's calls are); and of torch.mm of [n, H] x [H, N] for
    N = C and N = per_subset C. Medians of `rounds` rounds, the runners interleaved."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(problems, n, H, generator=g).relu_()
    y = torch.randint(0, C, (n,), generator=g)
    w = 0.01 * torch.randn(problems, H, C, generator=g)
    b = torch.zeros(problems, C)
    op = torch.ops.mmkernels.softmax_regression_loss_grad
    distinct = torch.arange(problems)
    grouped = torch.arange(problems // per_subset).repeat_interleave(per_subset)
    x = z[0]
    w10, w40 = torch.randn(H, C, generator=g), torch.randn(H, per_subset * C, generator=g)
    flops = 4.0 * n * H * C * problems
    runners = {
        "op_distinct_subsets": (flops, lambda: op(z, y, w, b, None, 0.0, distinct)),
        "op_side_by_side": (flops, lambda: op(z, y, w, b, None, 0.0, grouped)),
        f"mm_N{C}": (2.0 * n * H * C, lambda: torch.mm(x, w10)),
        f"mm_N{per_subset * C}": (2.0 * n * H * per_subset * C, lambda: torch.mm(x, w40)),
    }
    return _interleaved_rates(runners, rounds)


def _two_loop_tensor_ops(g: torch.Tensor, s: list, y: list, rho: list, gamma: torch.Tensor,
                         diag: torch.Tensor) -> torch.Tensor:
    """The two-loop recursion as in-place tensor ops, slot by slot over all problems (the
    solver's code before mmkernels::lbfgs_direction): the plain-PyTorch baseline."""
    q, alphas = g.clone(), []
    for sj, yj, rj in zip(s, y, rho, strict=True):
        a = torch.linalg.vecdot(sj, q).mul_(rj)
        q.addcmul_(a.unsqueeze(1), yj, value=-1.0)
        alphas.append(a)
    r = q.mul_(gamma.unsqueeze(1)).mul_(diag)
    for sj, yj, rj, a in zip(reversed(s), reversed(y), reversed(rho), reversed(alphas),
                             strict=True):
        r.addcmul_(a.sub_(torch.linalg.vecdot(yj, r).mul_(rj)).unsqueeze(1), sj)
    return r.neg_()


def lbfgs_direction_rates(k: int, P: int, m: int, rounds: int) -> dict[str, float]:
    """GB/s of the L-BFGS history (2 m k P float64) through mmkernels::lbfgs_direction and
    through the same recursion as tensor ops, and of one torch.sum pass over the history (a
    memory-speed floor: what reading it once takes). Medians of `rounds` interleaved rounds."""
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    grad = torch.randn(k, P, generator=g, dtype=f64)
    s = [torch.randn(k, P, generator=g, dtype=f64) for _ in range(m)]
    y = [sj * (0.5 + torch.rand(k, P, generator=g, dtype=f64)) for sj in s]
    rho = [1.0 / torch.linalg.vecdot(sj, yj) for sj, yj in zip(s, y, strict=True)]
    gamma, diag = torch.ones(k, dtype=f64), torch.rand(k, P, generator=g, dtype=f64) + 0.1
    history = 2.0 * m * k * P * 8
    op = torch.ops.mmkernels.lbfgs_direction
    runners = {
        "op": (history, lambda: op(grad, s, y, rho, gamma, diag)),
        "tensor_ops": (history, lambda: _two_loop_tensor_ops(grad, s, y, rho, gamma, diag)),
        "sum_once": (history, lambda: [t.sum() for t in (*s, *y)]),
    }
    return {name.replace("_gflops", "_gb_per_s"): v
            for name, v in _interleaved_rates(runners, rounds).items()}


def _interleaved_rates(runners: dict[str, tuple[float, Callable[[], object]]],
                       rounds: int) -> dict[str, float]:
    """{name}_gflops of each runner (flops, fn): the median of `rounds` timed calls, the
    runners interleaved call by call, after one warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _, fn in runners.values():
        fn()
    for _ in range(rounds):
        for name, (_, fn) in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {f"{name}_gflops": work / statistics.median(times[name]) / 1e9
            for name, (work, _) in runners.items()}


def _softmax_case(name: str, S: int, n: int, H: int, C: int, check: bool) -> HeadsCase:
    ztr, ytr, zte, yte = _classification_data(S, n, H, C, 1, torch.float32)

    def agreement() -> dict[str, float]:
        ours = heads.fit(ztr, ytr, task="classification", l2=L2)
        refs = _sk_logistic_loop(ztr, ytr)
        acc_ours = ours.accuracy(zte, yte).numpy()
        acc_sk = np.array([r.score(zte[s].numpy(), yte.numpy()) for s, r in enumerate(refs)])
        op = torch.ops.mmkernels.softmax_regression_loss_grad
        zd = ztr.double()
        W = torch.stack([torch.tensor(r.coef_.T, dtype=torch.float64) for r in refs])
        b = torch.stack([torch.tensor(r.intercept_, dtype=torch.float64) for r in refs])
        obj_sk = op(zd, ytr, W, b, None, L2)[0].numpy()
        obj_ours = op(zd, ytr, ours.coef, ours.intercept, None, L2)[0].numpy()
        return {"test_acc_max_abs_diff_points": float(100 * np.max(np.abs(acc_ours - acc_sk))),
                "objective_max_rel_diff": float(np.max(np.abs(obj_ours - obj_sk) / obj_sk)),
                "ours_converged": float(ours.converged.double().mean()),
                "ours_iters_total": float(ours.n_iter.sum()),
                "sklearn_iters_total": float(sum(int(r.n_iter_[0]) for r in refs)),
                "ours_iters_max": float(ours.n_iter.max())}

    return HeadsCase(
        name, {"S": S, "n": n, "H": H, "C": C, "dtype": "float32"},
        {"mmkernels": lambda: heads.fit(ztr, ytr, task="classification", l2=L2),
         "sklearn_loop": lambda: _sk_logistic_loop(ztr, ytr)},
        {"sklearn_loop": 10.0} if check else {}, agreement if check else None)


def heads_cases(scale: float = 1.0) -> list[HeadsCase]:
    """The benchmark cases; scale multiplies every n (1.0 = the shapes of the targets)."""
    def rows(n: int) -> int:
        return max(50, int(n * scale))
    return [
        _ridge_case("a_ridge_S15", 15, rows(7000), 128, check=True),
        _softmax_case("b_softmax_S7", 7, rows(13200), 128, 6, check=True),
        _ridge_case("c_ridge_S255", 255, rows(2000), 64, check=False),
        _softmax_case("c_softmax_S255", 255, rows(2000), 64, 6, check=False),
    ]


def run_heads(scale: float = 1.0, repeats: int = 1, only: list[str] | None = None) -> dict:
    """Run the cases, print a table, return the results as a dict (JSON-ready)."""
    results: dict = {"machine": machine(), "scale": scale, "cases": []}
    print(f"# {results['machine']}")
    print(f"{'case':16} {'runner':13} {'median ms':>10} {'speed-up':>9} {'target':>7}     "
          f"{'peak MB':>8}")
    for case in heads_cases(scale):
        if only and not any(o in case.name for o in only):
            continue
        times, peaks = {}, {}
        case.runners["mmkernels"]()  # warm-up (first-call costs); the baselines take seconds
        # Runners interleaved, repeat by repeat: on a shared machine the load drifts over
        # seconds, and a ratio of medians taken minutes apart would measure that drift.
        # A pause before each timed call: numpy's BLAS threads keep spinning for a while after
        # the sklearn loop returns, and the next runner would share the cores with them
        # (measured: our first softmax fit right after it took 2x its time).
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in case.runners}
        for _ in range(repeats):
            for name, fn in case.runners.items():
                time.sleep(SETTLE_S)
                runs[name].append(_peak_rss_growth_mb(fn))
        for name, rs in runs.items():
            times[name] = statistics.median(r[0] for r in rs)
            peaks[name] = max(r[1] for r in rs)
        rows = []
        for name, ms in times.items():
            speedup = ms / times["mmkernels"]
            target = case.targets.get(name)
            ok = "" if target is None else ("ok" if speedup >= target else "MISS")
            tgt = f"{target:.0f}x" if target else ""
            print(f"{case.name:16} {name:13} {ms:10.1f} {speedup:8.2f}x {tgt:>7} {ok:4} "
                  f"{peaks[name]:8.1f}")
            rows.append({"runner": name, "median_ms": ms, "speedup": speedup, "target": target,
                         "peak_rss_growth_mb": peaks[name]})
        agreement = case.check() if case.check else {}
        for key, value in agreement.items():
            print(f"{'':16} {key} = {value:.3g}")
        gemm = {}
        if case.gram_inputs is not None:
            time.sleep(SETTLE_S)
            gemm = gemm_rates(*case.gram_inputs, rounds=max(9, 3 * repeats))
            fit_gflops = gemm["gram_gflop"] / (times["mmkernels"] / 1e3)
            gemm["fit_gflops"] = fit_gflops
            gemm["gram_op_fraction_of_sgemm"] = gemm["gram_op_gflops"] / gemm["sgemm_square_gflops"]
            gemm["gram_op_fraction_of_aten"] = (gemm["gram_op_gflops"]
                                                / gemm["aten_same_gemms_gflops"])
            gemm["fit_fraction_of_sgemm"] = fit_gflops / gemm["sgemm_square_gflops"]
            side = int(gemm["sgemm_side"])
            print(f"{'':16} Gram GEMMs {gemm['gram_gflop']:.3g} GFLOP: op "
                  f"{gemm['gram_op_gflops']:.0f} GFLOP/s, the same GEMMs in ATen "
                  f"{gemm['aten_same_gemms_gflops']:.0f}, sgemm {side}^3 "
                  f"{gemm['sgemm_square_gflops']:.0f}; fit {fit_gflops:.0f}")
            print(f"{'':16} Gram op at {100 * gemm['gram_op_fraction_of_sgemm']:.0f} % of the "
                  f"sgemm rate ({100 * gemm['gram_op_fraction_of_aten']:.0f} % of ATen's), the "
                  f"whole fit at {100 * gemm['fit_fraction_of_sgemm']:.0f} %")
        results["cases"].append({"name": case.name, "shapes": case.shapes, "runners": rows,
                                 "agreement": agreement, "gemm_rate": gemm})
        sys.stdout.flush()
    if not only or any(o in "d_softmax_groups" for o in only):
        results["softmax_groups"] = {}
        for H in (128, 512):
            time.sleep(SETTLE_S)
            rates = softmax_group_rates(H, rounds=max(9, 3 * repeats))
            results["softmax_groups"][f"H{H}"] = rates
            print(f"d_softmax_groups H={H:<4} GFLOP/s: " + ", ".join(
                f"{k.removesuffix('_gflops')} {v:.0f}" for k, v in rates.items()))
    if not only or any(o in "e_lbfgs_direction" for o in only):
        time.sleep(SETTLE_S)
        k, P, m = 100, 5130, 10
        rates = lbfgs_direction_rates(k, P, m, rounds=max(9, 3 * repeats))
        results["lbfgs_direction"] = {"k": k, "P": P, "m": m, **rates}
        print(f"e_lbfgs_direction k={k} P={P} m={m} float64, history GB/s: " + ", ".join(
            f"{name.removesuffix('_gb_per_s')} {v:.1f}" for name, v in rates.items()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmkernels bench heads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="factor on every n")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="run only cases whose name contains one")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's own); on a busy shared "
                             "machine 1 thread avoids OpenMP regions waiting for a helper "
                             "thread that has no CPU")
    parser.add_argument("--out", type=Path, default=Path("bench-results/heads_cpu.json"))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run_heads(args.scale, args.repeats, args.only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
