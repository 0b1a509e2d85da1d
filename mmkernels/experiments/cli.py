"""The `mmkernels` command (also `python -m mmkernels`).

Subcommands: `reproduce` (the paper's experiments: Table 4 on synthetic data, Tables 1-3 and
the follow-ups on a bundled real multi-view dataset, on IEMOCAP with --iemocap), `sweep` (the
same protocol on a user's MultiModalDataset .npz file), `demo` (the fused ops on a small
multi-modal batch, checked against the reference, then the CPU benchmark), `bench` (the
benchmarks), `info` (the build).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def demo(args: argparse.Namespace) -> int:
    import mmkernels
    from mmkernels import reference
    from mmkernels.experiments.bench.cli import main as bench_main
    from mmkernels.subsets import all_subsets, subset_mask, subset_name

    gen = torch.Generator().manual_seed(0)
    letters, dims, batch, hidden = "TAV", [100, 100, 500], 256, 128
    xs = [torch.randn(batch, d, generator=gen) for d in dims]
    present = torch.rand(batch, 3, generator=gen) < 0.7
    subsets = all_subsets(3)
    mask = subset_mask(subsets, 3)
    weight = torch.randn(len(subsets), hidden, sum(dims), generator=gen) / sum(dims) ** 0.5
    out = mmkernels.concat_project(xs, weight, subset_mask=mask, sample_mask=present)
    ref = reference.concat_project(xs, weight, subset_mask=mask, sample_mask=present)
    names = ", ".join(subset_name(s, letters) for s in subsets)
    print(
        f"concat_project: {len(subsets)} subsets ({names}) x batch {batch} -> {tuple(out.shape)}, "
        f"max |ours - reference| = {(out - ref).abs().max().item():.2e}"
    )
    bench_args = ["--scale", str(args.scale), "--repeats", str(args.repeats)]
    return bench_main(bench_args)


def info(_: argparse.Namespace) -> int:
    import mmkernels

    print(json.dumps(mmkernels.build_info(), indent=2))
    return 0


def bench(args: argparse.Namespace) -> int:
    from mmkernels.experiments.bench.cli import main as bench_main

    return bench_main(args.bench_args)


def _sweep_config(args: argparse.Namespace, **over: Any):
    from mmkernels.experiments.sweep import SweepConfig

    kw = {"hidden": args.hidden, "fusion": args.fusion, "epochs": args.epochs,
          "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
          "seeds": list(range(args.seeds)), "fractions": list(args.fractions),
          "refit_fractions": list(args.refit_fractions or [max(args.fractions)]),
          "head_l2": args.head_l2, "head_cv_folds": args.head_cv_folds,
          "probe": not args.no_probe}
    kw.update(over)
    return SweepConfig(**kw)


def _add_sweep_args(p: argparse.ArgumentParser, *, epochs: int, seeds: int) -> None:
    from mmkernels.experiments.sweep import PAPER_FRACTIONS

    g = p.add_argument_group("training (paper defaults where public)")
    g.add_argument("--hidden", type=int, default=128, help="encoder width (paper: 128)")
    g.add_argument("--fusion", choices=["late", "early"], default="late",
                   help="late (paper's IEMOCAP setting) or early fusion")
    g.add_argument("--epochs", type=int, default=epochs, help="not public; default %(default)s")
    g.add_argument("--batch-size", type=int, default=2048, help="paper: 2048")
    g.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (paper: 0.01)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="not public; default 0")
    g.add_argument("--seeds", type=int, default=seeds, help="number of seeds (0..N-1)")
    g.add_argument("--fractions", type=float, nargs="+", default=list(PAPER_FRACTIONS),
                   help="training-set fractions (stratified, >= 1 sample per class)")
    g.add_argument("--refit-fractions", type=float, nargs="+", default=None,
                   help="fractions with head refits (Table 3) and the laziness probe; "
                        "default the largest fraction")
    g.add_argument("--head-l2", type=float, default=None,
                   help="a fixed l2 for every refitted head (default: chosen per subset by "
                        "cross-validation on the training rows)")
    g.add_argument("--head-cv-folds", type=int, default=5,
                   help="folds of that cross-validation (default %(default)s)")
    g.add_argument("--no-probe", action="store_true", help="skip the modality-laziness probe")
    p.add_argument("--out", default="results", help="results folder (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of in-process cells (default 1: the paper's models are "
                        "small, and on a shared 2-core CPU one thread ran the full reproduce "
                        "~4x faster than two; 0 keeps torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--fresh", action="store_true",
                   help="start over: move OUT/records.jsonl aside (kept, renamed) instead of "
                        "resuming from its finished cells")
    g = p.add_argument_group("where cells run")
    g.add_argument("--executor", choices=["inprocess", "ray"], default="inprocess",
                   help="inprocess (default) or ray: one Ray task per cell "
                        "(pip install 'mmkernels[ray]')")
    g.add_argument("--address", default=None,
                   help="Ray cluster address ('auto', 'ray://head:10001'); default: start a "
                        "local Ray")
    g.add_argument("--workers", type=int, default=None,
                   help="CPUs of the local Ray (default: all of this machine's)")
    g.add_argument("--cpus-per-cell", type=int, default=1,
                   help="Ray CPUs and torch threads per cell (default 1; records equal an "
                        "in-process run with the same --threads)")
    g.add_argument("--gpus-per-cell", type=float, default=0, help="Ray GPUs per cell")


def _store(args: argparse.Namespace) -> str:
    """OUT, the folder of the resumable results store; with --fresh an existing store is
    renamed first, under the store's lock (records.<UTC time>.jsonl), so nothing finished is
    lost."""
    from mmkernels.experiments.store import ResultStore

    if args.fresh:
        ResultStore(args.out).start_over()
    return str(args.out)


def _given(args: argparse.Namespace, dest: str) -> bool:
    """Whether the option for ``dest`` was typed on the command line (even at its default)."""
    opts = args.option_strings.get(dest, [])
    return any(tok == o or tok.startswith(o + "=") for tok in args.argv for o in opts)


@contextmanager
def _executor(args: argparse.Namespace) -> Iterator[Any]:
    """None (cells run in this process) or a RayExecutor, shut down afterwards."""
    if args.executor == "inprocess":
        ray_only = [d for d in ("address", "workers", "cpus_per_cell", "gpus_per_cell")
                    if _given(args, d)]
        if ray_only:
            raise SystemExit(f"--{ray_only[0].replace('_', '-')} applies to --executor ray only")
        yield None
        return
    from mmkernels.experiments.executors import RayExecutor

    with RayExecutor(args.address, cpus_per_cell=args.cpus_per_cell,
                     gpus_per_cell=args.gpus_per_cell, num_cpus=args.workers) as ex:
        yield ex


def reproduce(args: argparse.Namespace) -> int:
    """Table 4 (synthetic), then Tables 1-3 and the follow-ups on the bundled real data
    (and on IEMOCAP with --iemocap); writes the results folder and prints the claims."""
    from mmkernels.experiments.data import load_bundled, load_iemocap
    from mmkernels.experiments.report import RealResult, write_results
    from mmkernels.experiments.sweep import prepare, run_sweep
    from mmkernels.experiments.table4 import run_table4

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    progress = not args.no_progress
    if args.quick:
        args.seeds, args.epochs = min(args.seeds, 2), min(args.epochs, 30)
    t4_seeds = list(range(args.table4_seeds))
    t4 = run_table4(seeds=t4_seeds, n_train=args.n_train, n_test=args.n_test,
                    progress=progress)
    real = []
    cfg = _sweep_config(args)
    jobs = [(prepare(load_bundled(name), name), cfg) for name in args.bundled]
    if args.iemocap:
        jobs.append((prepare(load_iemocap(args.iemocap), "iemocap"),
                     _sweep_config(args, fusion="late")))
    store = _store(args)
    with _executor(args) as ex:
        for data, c in jobs:
            real.append(RealResult(data, c, run_sweep(data, c, progress=progress, store=store,
                                                      executor=ex)))
    runtime = time.perf_counter() - t0
    config = {"command": ["mmkernels", *sys.argv[1:]], "subcommand": "reproduce",
              "quick": args.quick, "table4": {"seeds": t4_seeds, "n_train": args.n_train,
                                              "n_test": args.n_test, "recipe": "mix",
                                              "overlaps": [1.0, 0.8, 0.5, 0.2, 0.0]},
              "real": {r.data.name: r.cfg.to_dict() for r in real},
              "iemocap": args.iemocap}
    report = write_results(args.out, table4_rows=t4, real=real, config=config,
                           runtime_s=runtime, title="mmkernels reproduce: Huang et al. 2021")
    _print_claims(args.out)
    print(f"report: {report} ({runtime:.1f} s)")
    return 0


def _print_claims(out: str) -> None:
    from pathlib import Path

    for c in json.loads((Path(out) / "claims.json").read_text()):
        verdict = {True: "holds", False: "does not hold", None: "not checked"}[c["holds"]]
        print(f"[{c['dataset']}] {c['claim']}: {verdict} ({c['detail']})")


# The options that define a sweep's results; `sweep --resume DIR` restores them from
# DIR/sweep.json. Where cells run (executor, threads, progress) may change on resume.
_SWEEP_OPTIONS = ("data", "name", "split_seed", "test_size", "hidden", "fusion", "epochs",
                  "batch_size", "lr", "weight_decay", "seeds", "fractions", "refit_fractions",
                  "head_l2", "head_cv_folds", "no_probe", "no_standardize")


def _resume_options(args: argparse.Namespace) -> None:
    """Load the sweep saved in ``args.resume`` into ``args``; an option given on the command
    line that contradicts it is an error rather than silently ignored."""
    from pathlib import Path

    saved_path = Path(args.resume) / "sweep.json"
    if not saved_path.is_file():
        raise SystemExit(f"--resume {args.resume}: no sweep.json there; it is not the --out "
                         "folder of a `mmkernels sweep` run")
    try:
        saved = json.loads(saved_path.read_text())["options"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--resume {args.resume}: unreadable sweep.json ({exc})") from None
    for flag in ("out", "fresh"):
        if _given(args, flag):
            raise SystemExit(f"--resume {args.resume}: --{flag} cannot be combined with "
                             "--resume (the sweep continues in DIR, keeping its records)")
    if _given(args, "data"):
        args.data = str(Path(args.data).resolve())
    for key in _SWEEP_OPTIONS:
        if key not in saved:
            continue
        if _given(args, key) and getattr(args, key) != saved[key]:
            raise SystemExit(f"--resume {args.resume}: --{key.replace('_', '-')} "
                             f"{getattr(args, key)} differs from the saved sweep's "
                             f"{saved[key]}; drop the option or start a new --out folder")
        setattr(args, key, saved[key])
    args.out, args.fresh = args.resume, False


def sweep(args: argparse.Namespace) -> int:
    """The sweep on a user's MultiModalDataset .npz (every subset, seed and fraction);
    ``--resume DIR`` continues the sweep saved in DIR."""
    from pathlib import Path

    from mmkernels.experiments.data import MultiModalDataset
    from mmkernels.experiments.io import write_json
    from mmkernels.experiments.report import RealResult, write_results
    from mmkernels.experiments.sweep import prepare, run_sweep

    if args.resume:
        _resume_options(args)
    elif args.data is None:
        raise SystemExit("mmkernels sweep: give --data FILE.npz (or --resume DIR)")
    else:
        args.data = str(Path(args.data).resolve())
        write_json(Path(args.out) / "sweep.json",
                   {"options": {k: getattr(args, k) for k in _SWEEP_OPTIONS}})
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ds = MultiModalDataset.load(args.data)
    name = args.name or Path(args.data).stem
    data = prepare(ds, name, split_seed=args.split_seed, test_size=args.test_size,
                   standardize=not args.no_standardize)
    cfg = _sweep_config(args)
    store = _store(args)
    with _executor(args) as ex:
        recs = run_sweep(data, cfg, progress=not args.no_progress, store=store, executor=ex)
    runtime = time.perf_counter() - t0
    config = {"command": ["mmkernels", *sys.argv[1:]], "subcommand": "sweep",
              "data": str(args.data), "name": name, "split_seed": args.split_seed,
              "test_size": args.test_size, "standardize": not args.no_standardize,
              "executor": args.executor, "sweep": cfg.to_dict()}
    report = write_results(args.out, real=[RealResult(data, cfg, recs)], config=config,
                           runtime_s=runtime, title=f"mmkernels sweep: {name}")
    _print_claims(args.out)
    print(f"report: {report} ({runtime:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmkernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # allow_abbrev=False: options are recognised only when spelled out (see _given)
    p = sub.add_parser("reproduce", allow_abbrev=False,
                       help="the paper's tables: synthetic Table 4, Tables 1-3 on bundled real "
                            "data (and IEMOCAP with --iemocap)")
    _add_sweep_args(p, epochs=50, seeds=5)
    p.add_argument("--quick", action="store_true",
                   help="fast pass: at most 2 seeds and 30 epochs on the real data")
    p.add_argument("--iemocap", default=None, metavar="PATH",
                   help="also run Tables 1-3 on an IEMOCAP feature pickle")
    p.add_argument("--bundled", nargs="*", default=["digits"],
                   help="bundled real datasets to sweep (default: digits)")
    p.add_argument("--table4-seeds", type=int, default=5)
    p.add_argument("--n-train", type=int, default=7000, help="synthetic train rows")
    p.add_argument("--n-test", type=int, default=3000, help="synthetic test rows")
    p.set_defaults(fn=reproduce)
    p = sub.add_parser("sweep", allow_abbrev=False,
                       help="every subset x seed x fraction on your .npz dataset")
    p.add_argument("--data", default=None, help="a MultiModalDataset .npz file")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the sweep whose --out folder is DIR: its saved options, "
                        "its finished cells kept; only the unfinished cells run")
    p.add_argument("--name", default=None, help="dataset name in the results")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the train/test split when the file has none")
    p.add_argument("--test-size", type=float, default=0.3)
    p.add_argument("--no-standardize", action="store_true",
                   help="use the features as stored (default: each feature standardised with "
                        "the training rows' mean and standard deviation)")
    _add_sweep_args(p, epochs=50, seeds=3)
    p.set_defaults(fn=sweep)
    p = sub.add_parser("demo", help="the fused ops on a small batch, then the CPU benchmark")
    p.add_argument("--scale", type=float, default=1.0, help="benchmark batch-size factor")
    p.add_argument("--repeats", type=int, default=7)
    p.set_defaults(fn=demo)
    p = sub.add_parser("bench", help="benchmarks (mmkernels bench --help)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=bench)
    sub.add_parser("info", help="build information").set_defaults(fn=info)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # Which options were typed, for checks that must tell "given" from "left at default".
    sub_parser = sub.choices[args.command]
    args.argv = argv
    args.option_strings = {a.dest: a.option_strings for a in sub_parser._actions}
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
