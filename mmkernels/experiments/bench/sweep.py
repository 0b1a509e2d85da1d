"""Benchmark: a 64-cell sweep in this process against the same sweep on a local Ray.

    mmkernels bench sweep [--workers 2] [--out PATH.json]

The sweep: a 3-modality classification dataset (random class centres plus noise; n = 1,500,
dims 20 / 20 / 40, 4 classes), every subset (7), hidden 32, 20 epochs, 16 seeds x fractions
0.1 / 0.3 / 0.5 / 1 = 64 cells, head refits at fraction 1. Both runs append to a fresh results
store, and their records are checked equal. Reported:

* wall time in-process (one torch thread) and on Ray (``--workers`` CPUs, one per cell), the
  Ray start-up timed apart from the sweep; then both sweeps once more, warm (a process's first
  cells pay one-off set-up: about 1.3 s in-process, and on Ray starting the worker processes
  and importing torch and mmkernels in each);
* overhead per cell = (workers x Ray wall - in-process wall) / cells, cold and warm: the
  worker time per cell not spent computing it (dispatch, argument transfer, worker start,
  result collection, and the cores' contention with Ray's own processes);
* dispatch per task: 64 empty tasks through the same executor, once its workers are warm.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmkernels.experiments.bench.timing import machine
from mmkernels.experiments.data import MultiModalDataset
from mmkernels.experiments.store import read_records
from mmkernels.experiments.sweep import SweepConfig, prepare, run_sweep

__all__ = ["main"]


def _dataset(n: int = 1500, dims: tuple[int, ...] = (20, 20, 40), classes: int = 4,
             seed: int = 0) -> MultiModalDataset:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    mods = {}
    for k, d in enumerate(dims):
        centres = rng.normal(size=(classes, d))
        mods[f"m{k}"] = (centres[y] + 2.0 * rng.normal(size=(n, d))).astype(np.float32)
    split = np.where(rng.random(n) < 0.7, "train", "test")
    return MultiModalDataset(mods, y, task="classification", split=split)


def _noop(x: int) -> int:
    return x


def _cells(folder: Path) -> dict[str, dict]:
    return {r["key"]: r["records"] for r in read_records(folder)}


def main(argv: list[str] | None = None) -> int:
    from mmkernels.experiments.executors import RayExecutor

    parser = argparse.ArgumentParser(prog="mmkernels bench sweep",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="local Ray CPUs (default 2)")
    parser.add_argument("--seeds", type=int, default=16, help="seeds (x 4 fractions = cells)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/sweep.json"))
    args = parser.parse_args(argv)

    data = prepare(_dataset(), "bench")
    cfg = SweepConfig(hidden=32, epochs=20, seeds=list(range(args.seeds)),
                      fractions=[0.1, 0.3, 0.5, 1.0], refit_fractions=[1.0], probe=False)
    cells = len(cfg.seeds) * len(cfg.fractions)
    info = machine()
    print(f"# {info}\n# {cells} cells, {len(data.subsets)} subsets each")
    with tempfile.TemporaryDirectory() as tmp:
        local_dir, ray_dir = Path(tmp) / "local", Path(tmp) / "ray"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        run_sweep(data, cfg, progress=False, store=local_dir)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()  # again: the first cells of a process pay one-off set-up
        run_sweep(data, cfg, progress=False, store=Path(tmp) / "local-warm")
        t_local_warm = time.perf_counter() - t0
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        with RayExecutor(num_cpus=args.workers, cpus_per_cell=1) as ex:
            t_init = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_sweep(data, cfg, progress=False, store=ray_dir, executor=ex)
            t_ray = time.perf_counter() - t0
            t0 = time.perf_counter()  # again, on workers that have imported everything
            run_sweep(data, cfg, progress=False, store=Path(tmp) / "warm", executor=ex)
            t_warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            for f in [ex.submit(_noop, i) for i in range(64)]:
                f.result()
            t_noop = time.perf_counter() - t0
        equal = (_cells(local_dir) == _cells(ray_dir) == _cells(Path(tmp) / "warm")
                 == _cells(Path(tmp) / "local-warm"))
    res = {
        "machine": info, "cells": cells, "workers": args.workers,
        "in_process_s": t_local, "in_process_per_cell_ms": 1e3 * t_local / cells,
        "ray_start_s": t_init, "ray_s": t_ray, "speedup": t_local / t_ray,
        "overhead_per_cell_ms": 1e3 * (args.workers * t_ray - t_local) / cells,
        "in_process_warm_s": t_local_warm, "ray_warm_s": t_warm,
        "speedup_warm": t_local_warm / t_warm,
        "overhead_per_cell_warm_ms": 1e3 * (args.workers * t_warm - t_local_warm) / cells,
        "dispatch_per_task_ms": 1e3 * t_noop / 64, "records_equal": equal,
    }
    print(f"in-process: {t_local:.2f} s ({res['in_process_per_cell_ms']:.0f} ms/cell)\n"
          f"Ray, {args.workers} workers: {t_ray:.2f} s (+ {t_init:.2f} s start-up), "
          f"speed-up {res['speedup']:.2f}x, overhead {res['overhead_per_cell_ms']:.0f} ms/cell, "
          f"empty-task dispatch {res['dispatch_per_task_ms']:.2f} ms/task\n"
          f"again, warm: in-process {t_local_warm:.2f} s, Ray {t_warm:.2f} s, "
          f"speed-up {res['speedup_warm']:.2f}x, "
          f"overhead {res['overhead_per_cell_warm_ms']:.0f} ms/cell\n"
          f"records equal: {equal}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"# wrote {args.out}")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
