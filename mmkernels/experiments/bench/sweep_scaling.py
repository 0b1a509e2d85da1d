"""Benchmark: a sweep cell whose cost grows with the work as modalities grow (issue 14).

    mmkernels bench sweep-scaling [--max-k 8] [--scaling-epochs 5] [--out DIR]

Part 1, the fraction-1 cell of `mmkernels sweep` with every default, on synthetic data of a
real 6-view dataset's size (2,000 samples, 10 classes, views of widths 6 / 47 / 64 / 76 / 216 /
240, one of them with values in the hundreds, a 70/30 split): all 63 subsets, hidden 128, 50
epochs, batch 2048, late fusion, features standardised with the training rows' statistics, head
l2 by 5-fold cross-validation, the laziness probe; one torch thread. Reported per phase (wall
and CPU seconds): training (training.fit + evaluate), refits (eta.refit_quality), probe; the
native head op's share of the refits. Baselines in the same run, on the same trained encoders:

* padded: the refit at a fixed l2 = 1 on Z padded to K * H = 768 columns for every subset (one
  in-memory [63, n, 768] tensor), against the same refit on each subset's own m * H columns;
* streamed: the old path when the padded Z did not fit the 512 MiB streaming budget (the
  encoder re-run and Z re-scanned for NaN at every L-BFGS evaluation): the seconds of one such
  evaluation, measured over three, times the evaluations the padded fit needed. An estimate:
  the real run takes over 20 minutes.
* allocation cache: training steps of the cell's model (forward, backward, Adam) with and
  without the CPU allocation cache (mmkernels.cpu_memory; the sweep turns it on), in
  alternating rounds, CPU seconds per step (median of the rounds).

The whole cell runs with the allocation cache on, as `mmkernels sweep` does. The import that
torch.optim's first optimizer of a process triggers (torch._dynamo, ~2.5 s) is done and timed
before the cells: in a sweep only the first cell pays it.

Part 2, cost against K = 2..max-k (S = 3..255): K views of width 32, 2,000 samples, 10 classes,
hidden 32, scaling-epochs epochs, the sweep's defaults otherwise. Reported per K: the (subset,
modality) pairs K 2^(K-1), seconds of training, refits and probe, refit seconds per pair, the op's
share of the refits (the rest is Python and the solver's own small tensor ops), and a log-log
plot against the pairs (sweep_scaling.png).

The machine is shared: every result records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmkernels.experiments.bench.timing import machine
from mmkernels.experiments.data import MultiModalDataset

__all__ = ["main", "views_dataset"]

SIX_WIDTHS = (6, 47, 64, 76, 216, 240)


def views_dataset(widths: tuple[int, ...], *, n: int = 2000, classes: int = 10, seed: int = 0,
                  raw_view: int | None = None) -> MultiModalDataset:
    """Class centres plus noise per view, the views from weak to strong; view ``raw_view``
    shifted to values in the hundreds (as raw features often are). 70/30 train/test split."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    mods = {}
    for k, d in enumerate(widths):
        strength = 0.15 + 0.6 * k / max(1, len(widths) - 1)
        x = strength * rng.normal(size=(classes, d))[y] + rng.normal(size=(n, d))
        if k == raw_view:
            x = 300.0 + 40.0 * x
        mods[f"v{k}"] = x.astype(np.float32)
    split = np.where(rng.random(n) < 0.7, "train", "test")
    return MultiModalDataset(mods, y, task="classification", split=split)


class _Clock:
    """Wall and CPU seconds per phase, from wrappers put around functions."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, fn: Callable, phase: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[phase] += time.perf_counter() - w
                self.cpu[phase] += time.process_time() - c
                self.calls[phase] += 1
        return timed

    @contextmanager
    def patched(self, obj: Any, name: str, phase: str) -> Iterator[None]:
        old = getattr(obj, name)
        setattr(obj, name, self.wrap(old, phase))
        try:
            yield
        finally:
            setattr(obj, name, old)


class _TimedOps:
    """heads' native ops with their calls timed: the head ops (phase "op") and the solver's
    L-BFGS directions (phase "direction")."""

    def __init__(self, clock: _Clock) -> None:
        ops = torch.ops.mmkernels
        self.softmax_regression_loss_grad = clock.wrap(ops.softmax_regression_loss_grad, "op")
        self.gram = clock.wrap(ops.gram, "op")
        self.lbfgs_direction = clock.wrap(ops.lbfgs_direction, "direction")


@contextmanager
def _phases(clock: _Clock) -> Iterator[None]:
    from mmkernels import eta, heads, training
    from mmkernels.experiments import sweep

    with ExitStack() as stack:
        stack.enter_context(clock.patched(training, "fit", "train"))
        stack.enter_context(clock.patched(training, "evaluate", "train"))
        stack.enter_context(clock.patched(eta, "refit_quality", "refit"))
        stack.enter_context(clock.patched(sweep, "laziness_probe", "probe"))
        stack.enter_context(_swap(heads, "_ops", _TimedOps(clock)))
        yield


@contextmanager
def _swap(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _one_off_imports() -> float:
    """Seconds of the import that torch.optim's first optimizer of a process triggers
    (torch._dynamo, through torch._disable_dynamo): a sweep's first cell pays it, no other."""
    t0 = time.perf_counter()
    import torch._dynamo  # noqa: F401

    return time.perf_counter() - t0


def _cell(data, cfg) -> tuple[dict, _Clock, float, float, Any]:
    """run_cell timed by phase; also returns the cell's trained model."""
    from mmkernels.experiments import sweep

    clock = _Clock()
    models = []
    make = sweep._model
    with _phases(clock), _swap(sweep, "_model", lambda *a: models.append(make(*a)) or models[-1]):
        w, c = time.perf_counter(), time.process_time()
        sweep.run_cell(data, 0, 1.0, cfg)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
    phases = {k: clock.wall[k] for k in ("train", "refit", "probe", "op", "direction")}
    return phases, clock, wall, cpu, models[0]


def _baselines(data, cfg, model) -> dict[str, Any]:
    """The padded and the streamed refit on the trained encoders of the cell."""
    from mmkernels import heads

    y, H = data.train_y, cfg.hidden
    t0 = time.perf_counter()
    z = model.latents(data.train_xs)
    t_encode = time.perf_counter() - t0
    cols = [torch.cat([torch.arange(k * H, (k + 1) * H) for k in s]) for s in data.subsets]
    t0 = time.perf_counter()
    gz = heads.GroupedZ.from_source(z, cols)
    t_group = time.perf_counter() - t0
    clock = _Clock()
    with _swap(heads, "_ops", _TimedOps(clock)):
        t0 = time.perf_counter()
        padded = heads.fit(z, y, task="classification", l2=1.0, num_classes=data.num_outputs)
        t_padded = time.perf_counter() - t0
        evaluations = clock.calls["op"]   # one solver group: one op call per evaluation
        t0 = time.perf_counter()
        compact = heads.fit(gz, y, task="classification", l2=1.0,
                            num_classes=data.num_outputs)
        t_compact = time.perf_counter() - t0
    same = float((padded.risk(z, y) - compact.risk(gz, y)).abs().max())
    # The old streamed evaluation: the padded Z in chunks of the 512 MiB budget, each chunk
    # encoded, scanned for NaN and evaluated.
    src = heads.encoded(model.latents, data.train_xs)
    step = src.rows_per_chunk(16 * data.num_outputs)
    W = torch.zeros(len(data.subsets), z.shape[2], data.num_outputs)
    b = torch.zeros(len(data.subsets), data.num_outputs)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for r0 in range(0, src.num_rows, step):
            chunk = src.encode(r0, min(src.num_rows, r0 + step))
            bool(torch.isfinite(chunk).all())
            torch.ops.mmkernels.softmax_regression_loss_grad(
                chunk, y[r0:r0 + chunk.shape[1]], W, b, None, 0.0)
        times.append(time.perf_counter() - t0)
    per_eval = sorted(times)[1]
    return {"encode_s": t_encode, "group_by_width_s": t_group,
            "padded_refit_s": t_padded, "compact_refit_s": t_compact,
            "padded_over_compact": t_padded / t_compact,
            "max_risk_difference": same, "evaluations": evaluations,
            "streamed_rows_per_chunk": step, "streamed_eval_s": per_eval,
            "streamed_refit_estimate_s": per_eval * evaluations,
            "streamed_over_compact_estimate": per_eval * evaluations / t_compact}


def _allocation_cache_steps(data, cfg, rounds: int = 5, steps: int = 3) -> dict[str, float]:
    """CPU seconds per training step with and without the allocation cache, interleaved."""
    from mmkernels import cpu_memory
    from mmkernels.experiments import sweep

    model = sweep._model(data, cfg, 0)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    xs, y = data.train_xs, data.train_y

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.losses(model(xs, data.train_mask), y).sum().backward()
        opt.step()

    times: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for _ in range(rounds):
            for mode in ("off", "on"):
                if mode == "on":
                    cpu_memory.enable_allocation_cache()
                else:
                    cpu_memory.disable_allocation_cache()
                step()  # the first step of a mode fills the cache (or empties it)
                c = time.process_time()
                for _ in range(steps):
                    step()
                times[mode].append((time.process_time() - c) / steps)
    finally:
        cpu_memory.enable_allocation_cache()
    on, off = float(np.median(times["on"])), float(np.median(times["off"]))
    return {"step_cpu_s_cache_on": on, "step_cpu_s_cache_off": off, "off_over_on": off / on}


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = np.array([r["pairs"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for key, label, marker in (("refit_s", "refits (CV l2)", "o"),
                               ("train_s", "training", "s"), ("probe_s", "probe", "^")):
        ax.loglog(pairs, [r[key] for r in rows], marker=marker, label=label)
    last = rows[-1]
    ax.loglog(pairs, last["refit_s"] * pairs / pairs[-1], "k:", label="linear in pairs")
    for r in rows:
        ax.annotate(f"K={r['K']}", (r["pairs"], r["refit_s"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7)
    ax.set_xlabel("(subset, modality) pairs, K 2^(K-1)")
    ax.set_ylabel("seconds (wall, one thread)")
    ax.set_title("a sweep cell against the number of modalities")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from mmkernels.experiments.sweep import SweepConfig, prepare

    parser = argparse.ArgumentParser(prog="mmkernels bench sweep-scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50, help="part 1 (the sweep's default)")
    parser.add_argument("--max-k", type=int, default=8, help="part 2: K = 2..max-k")
    parser.add_argument("--scaling-epochs", type=int, default=5, help="part 2's epochs")
    parser.add_argument("--skip", choices=["cell", "baselines", "scaling"], nargs="*",
                        default=[])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from mmkernels.cpu_memory import enable_allocation_cache

    enable_allocation_cache()  # as mmkernels sweep does
    res: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg()}
    print(f"# {res['machine']}\n# load average {res['load_before']}")
    try:
        six = prepare(views_dataset(SIX_WIDTHS, raw_view=4), "six", standardize=True)
        cfg = SweepConfig(epochs=args.epochs, seeds=[0], fractions=[1.0])
        res["one_off_import_s"] = _one_off_imports()
        print(f"one-off import of torch._dynamo (torch.optim's first optimizer; paid before "
              f"the timed cells): {res['one_off_import_s']:.1f} s")
        if "cell" not in args.skip:
            phases, clock, wall, cpu, model = _cell(six, cfg)
            res["cell"] = {"wall_s": wall, "cpu_s": cpu, **{f"{k}_s": v for k, v in
                                                           phases.items()},
                           "cpu": dict(clock.cpu),
                           "refit_over_train": phases["refit"] / phases["train"],
                           "op_share_of_refit_and_probe":
                               phases["op"] / (phases["refit"] + phases["probe"])}
            c = clock.cpu
            print(f"part 1, fraction-1 cell (63 subsets, {args.epochs} epochs): {wall:.1f} s "
                  f"wall ({cpu:.1f} s CPU): training {phases['train']:.1f} s ({c['train']:.1f}"
                  f" CPU), refits {phases['refit']:.1f} s ({c['refit']:.1f} CPU), probe "
                  f"{phases['probe']:.1f} s ({c['probe']:.1f} CPU); refit / training "
                  f"{res['cell']['refit_over_train']:.2f}; native op "
                  f"{100 * res['cell']['op_share_of_refit_and_probe']:.0f} % of refits + probe"
                  f", L-BFGS directions {phases['direction']:.1f} s")
        if "baselines" not in args.skip and "cell" not in args.skip:
            base = _baselines(six, cfg, model)
            res["baselines"] = base
            print(f"refit at l2 = 1: own width {base['compact_refit_s']:.2f} s, padded to 768 "
                  f"{base['padded_refit_s']:.2f} s ({base['padded_over_compact']:.2f}x); old "
                  f"streamed path {base['streamed_eval_s']:.2f} s per evaluation x "
                  f"{base['evaluations']} evaluations = ~{base['streamed_refit_estimate_s']:.0f}"
                  f" s (estimate, {base['streamed_over_compact_estimate']:.0f}x)")
            steps = _allocation_cache_steps(six, cfg)
            res["allocation_cache"] = steps
            print(f"training step: {steps['step_cpu_s_cache_on']:.3f} s CPU with the allocation"
                  f" cache, {steps['step_cpu_s_cache_off']:.3f} s without "
                  f"({steps['off_over_on']:.2f}x)", flush=True)
        rows = []
        if "scaling" not in args.skip:
            for K in range(2, args.max_k + 1):
                data = prepare(views_dataset((32,) * K, seed=K), f"K{K}", standardize=True)
                scfg = SweepConfig(hidden=32, epochs=args.scaling_epochs, seeds=[0],
                                   fractions=[1.0])
                phases, clock, wall, cpu, _ = _cell(data, scfg)
                pairs = K * 2 ** (K - 1)
                row = {"K": K, "S": 2 ** K - 1, "pairs": pairs, "wall_s": wall, "cpu_s": cpu,
                       "train_s": phases["train"], "refit_s": phases["refit"],
                       "probe_s": phases["probe"], "op_s": phases["op"],
                       "direction_s": phases["direction"], "cpu": dict(clock.cpu),
                       "refit_ms_per_pair": 1e3 * phases["refit"] / pairs,
                       "train_ms_per_pair": 1e3 * phases["train"] / pairs,
                       "op_share_of_refit_and_probe":
                           phases["op"] / (phases["refit"] + phases["probe"])}
                rows.append(row)
                print(f"K={K} S={row['S']} pairs={pairs}: {wall:.1f} s ({cpu:.1f} s CPU), "
                      f"training {row['train_s']:.2f} s, "
                      f"refits {row['refit_s']:.2f} s ({row['refit_ms_per_pair']:.1f} ms/pair),"
                      f" probe {row['probe_s']:.2f} s, op "
                      f"{100 * row['op_share_of_refit_and_probe']:.0f} % of refits + probe",
                      flush=True)
            res["scaling"] = rows
            if len(rows) >= 2:
                a, b = rows[min(len(rows) // 2, len(rows) - 2)], rows[-1]
                res["refit_loglog_slope"] = float(np.log(b["refit_s"] / a["refit_s"])
                                                  / np.log(b["pairs"] / a["pairs"]))
                print(f"refit time ~ pairs^{res['refit_loglog_slope']:.2f} from K={a['K']} to "
                      f"K={b['K']}")
    finally:
        torch.set_num_threads(threads)
    res["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    if rows:
        _plot(rows, args.out / "sweep_scaling.png")
    (args.out / "sweep_scaling.json").write_text(json.dumps(res, indent=2))
    print(f"# load average after {res['load_after']}\n# wrote {args.out / 'sweep_scaling.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
