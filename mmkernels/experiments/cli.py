"""The `mmkernels` command (also `python -m mmkernels`).

Subcommands: `reproduce` (the paper's experiments: Table 4 on synthetic data, Tables 1-3 and
the follow-ups on a bundled real multi-view dataset, on IEMOCAP with --iemocap), `sweep` (the
same protocol on a user's MultiModalDataset .npz file), `demo` (the fused ops on a small
multi-modal batch, checked against the reference, then the CPU benchmark), `bench` (the
benchmarks), `info` (the build).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
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
    """The SweepConfig of the options; a setting out of range is a SystemExit naming its
    option."""
    from mmkernels.experiments.sweep import SweepConfig, SweepConfigError

    kw = {"hidden": args.hidden, "fusion": args.fusion, "epochs": args.epochs,
          "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
          "seeds": list(range(args.seeds)), "fractions": list(args.fractions),
          "refit_fractions": None if args.refit_fractions is None
          else list(args.refit_fractions),
          "head_l2": args.head_l2, "head_cv_folds": args.head_cv_folds,
          "probe": not args.no_probe}
    kw.update(over)
    try:
        return SweepConfig(**kw)
    except SweepConfigError as exc:
        raise _refusal(args, f"--{exc.field.replace('_', '-')}: {exc.detail}") from None


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
    g.add_argument("--device", default="cpu",
                   help="cpu (default), cuda or cuda:N: each cell's model, data, training and "
                        "head refits on that device (with --executor ray, give "
                        "--gpus-per-cell too)")
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


def _refusal(args: argparse.Namespace, message: str) -> SystemExit:
    """The exit of a run refused before it wrote anything: one line, status 1."""
    return SystemExit(f"mmkernels {args.command}: {message}")


def _check_memory_budget_setting(args: argparse.Namespace) -> None:
    """A malformed MMKERNELS_MEMORY_BUDGET is refused before anything runs, not in the middle
    of a sweep; so is one that reads as "no limit" without saying "off" (the extension
    built before the fix took "0" for "off")."""
    from mmkernels.memory import ENV_VAR, memory_budget

    text = os.environ.get(ENV_VAR)
    if text is None:
        return
    try:
        limit, _ = memory_budget()
    except ValueError as exc:
        raise _refusal(args, str(exc)) from None
    if math.isinf(limit) and text.strip().lower() not in ("off", "none"):
        raise _refusal(args, f"{ENV_VAR} must be a byte count such as 1073741824, 512M, 8G "
                             f'or 8GiB, finite and > 0 (or "off"), got "{text}"')


def _check_options(args: argparse.Namespace) -> None:
    """The options that SweepConfig does not see, each refused by name (SystemExit)."""
    def at_least(dest: str, low: int) -> None:
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise _refusal(args, f"--{dest.replace('_', '-')}: expected an int >= {low}, "
                                 f"got {value}")

    if args.seeds < 1:
        raise _refusal(args, f"--seeds: expected a number of seeds >= 1, got {args.seeds}")
    for dest, low in (("threads", 0), ("split_seed", 0), ("table4_seeds", 1), ("n_train", 1),
                      ("n_test", 1)):
        at_least(dest, low)
    test_size = getattr(args, "test_size", None)
    if test_size is not None and not 0 < test_size < 1:
        raise _refusal(args, f"--test-size: expected a number in (0, 1), got {test_size:g}")
    name = getattr(args, "name", None)
    if name is not None and (name in ("", ".", "..") or "/" in name or "\0" in name):
        raise _refusal(args, f"--name: expected a plain file name (it names the result "
                             f"files), got {name!r}")
    if not args.out:
        raise _refusal(args, f"--out: expected a folder, got {args.out!r}")
    from mmkernels.experiments.sweep import check_device

    try:
        device = check_device(args.device)
    except ValueError as exc:
        raise _refusal(args, f"--device: {exc}") from None
    if device.type == "cuda" and args.executor == "ray" and not args.gpus_per_cell:
        raise _refusal(args, "--device cuda with --executor ray: give --gpus-per-cell (Ray "
                             "hides the GPUs from a task that asked for none)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise _refusal(args, f"--out {args.out} is a file, not a folder")
    if args.executor == "inprocess":
        ray_only = [d for d in ("address", "workers", "cpus_per_cell", "gpus_per_cell")
                    if _given(args, d)]
        if ray_only:
            raise _refusal(args, f"--{ray_only[0].replace('_', '-')} applies to --executor "
                                 "ray only")
        return
    at_least("cpus_per_cell", 1)
    at_least("workers", 1)
    if not (math.isfinite(args.gpus_per_cell) and args.gpus_per_cell >= 0):
        raise _refusal(args, f"--gpus-per-cell: expected a finite number >= 0, got "
                             f"{args.gpus_per_cell:g}")


def _claim(args: argparse.Namespace, out: Path, record: dict[str, Any], *, write: bool) -> None:
    """Refuse an OUT that holds the results of a run with other options (they would replace
    its report, tables and figures); otherwise, with ``write``, record this run's options in
    OUT/sweep.json (written once: a rerun with the same options leaves it as it is)."""
    from mmkernels.experiments.io import write_json

    path = out / "sweep.json"
    record = json.loads(json.dumps(record))  # tuples as lists, as read back
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            saved_cmd, saved_opts = saved.get("subcommand", "sweep"), saved["options"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _refusal(args, f"--out {out}: unreadable sweep.json ({exc}); use another "
                                 "--out folder") from None
        if saved_cmd != record["subcommand"]:
            raise _refusal(args, f"--out {out} holds the results of `mmkernels {saved_cmd}`; "
                                 "use another --out folder")
        for key, theirs in saved_opts.items():
            ours = record["options"].get(key, theirs)
            if ours != theirs:
                raise _refusal(args, f"--out {out} holds the results of another {saved_cmd} "
                                     f"(--{key.replace('_', '-')} {_shown(theirs)} there, "
                                     f"{_shown(ours)} here), which this run would replace; "
                                     "use another --out folder"
                                     + (f", or --resume {out} to continue it"
                                        if saved_cmd == "sweep" else ""))
        return
    if write:
        write_json(path, record)


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _cells_stored(out: Path) -> int:
    from mmkernels.experiments.store import read_records

    try:
        return len(read_records(out))
    except (OSError, ValueError):
        return 0


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run: `sweep --resume OUT` where OUT has a saved sweep,
    else this command again (without --fresh, which would start over once more)."""
    out = Path(args.out)
    if args.command == "sweep" and (out / "sweep.json").is_file():
        return shlex.join(["mmkernels", "sweep", "--resume", str(out)])
    return shlex.join(["mmkernels", *[a for a in args.argv if a != "--fresh"]])


def _stopped(args: argparse.Namespace, what: str) -> str:
    """One line: what stopped the run, how many cells OUT holds, how to resume."""
    n = _cells_stored(Path(args.out))
    return (f"mmkernels {args.command}: {what}; {n} cell{' is' if n == 1 else 's are'} stored "
            f"in {args.out}; resume with: {_resume_command(args)}")


@contextmanager
def _results_folder(args: argparse.Namespace, record: dict[str, Any]) -> Iterator[Any]:
    """Hold OUT's store lock for the whole run and yield its ResultStore, once OUT has been
    claimed for this run (see _claim); --fresh renames the old records under the lock."""
    from mmkernels.experiments.io import remove_stale_temporaries
    from mmkernels.experiments.store import ResultStore

    out = Path(args.out)
    _claim(args, out, record, write=False)  # refused before the lock: nothing is touched
    rs = ResultStore(out)
    with rs.locked():
        _claim(args, out, record, write=True)  # again: another run may have claimed OUT
        remove_stale_temporaries(out)  # no other run can be writing OUT now
        if args.fresh:
            rs.start_over()  # the old records are kept as records.<UTC time>.jsonl
        yield rs


def _report_diverged(args: argparse.Namespace, recs: dict[str, list], cfg: Any) -> None:
    cells = sorted({(r["seed"], r["fraction"]) for r in recs.get("diverged", [])})
    if cells:
        print(f"mmkernels {args.command}: {len(cells)} of {len(cfg.seeds) * len(cfg.fractions)} "
              "cells diverged (a loss or a parameter not finite); report.md lists them, and "
              "they are left out of every table", file=sys.stderr)


def _given(args: argparse.Namespace, dest: str) -> bool:
    """Whether the option for ``dest`` was typed on the command line (even at its default)."""
    opts = args.option_strings.get(dest, [])
    return any(tok == o or tok.startswith(o + "=") for tok in args.argv for o in opts)


@contextmanager
def _executor(args: argparse.Namespace) -> Iterator[Any]:
    """None (cells run in this process) or a RayExecutor, shut down afterwards (the options
    were checked by _check_options)."""
    if args.executor == "inprocess":
        yield None
        return
    from mmkernels.experiments.executors import RayExecutor

    with RayExecutor(args.address, cpus_per_cell=args.cpus_per_cell,
                     gpus_per_cell=args.gpus_per_cell, num_cpus=args.workers) as ex:
        yield ex


def _prepared(args: argparse.Namespace, option: str, load: Any, name: str,
              **kw: Any) -> Any:
    """prepare(load(), name), every failure a refusal naming ``option`` (e.g. "--data PATH"):
    a file that cannot be read, fails validation or does not fit the sweep (too many
    modalities, features that overflow the float32 it trains in)."""
    from mmkernels.experiments.sweep import MAX_MODALITIES, prepare

    try:
        ds = load()
    except (OSError, ValueError) as exc:  # the loaders' messages name the file
        raise _refusal(args, f"{option.split()[0]}: {exc}") from None
    if ds.n_modalities > MAX_MODALITIES:
        raise _refusal(args, f"{option}: {ds.n_modalities} modalities; a sweep takes at most "
                             f"{MAX_MODALITIES}")
    try:
        return prepare(ds, name, **kw)
    except ValueError as exc:
        raise _refusal(args, f"{option}: {exc}") from None


# The options that define the results of `reproduce` (its folder's sweep.json).
_REPRODUCE_OPTIONS = ("quick", "bundled", "iemocap", "table4_seeds", "n_train", "n_test",
                      "hidden", "fusion", "epochs", "batch_size", "lr", "weight_decay", "seeds",
                      "fractions", "refit_fractions", "head_l2", "head_cv_folds", "no_probe")


def reproduce(args: argparse.Namespace) -> int:
    """Table 4 (synthetic), then Tables 1-3 and the follow-ups on the bundled real data
    (and on IEMOCAP with --iemocap); writes the results folder and prints the claims.
    Everything is checked and loaded before OUT is touched (see sweep)."""
    from mmkernels.experiments.data import load_bundled, load_iemocap
    from mmkernels.experiments.report import RealResult, write_results
    from mmkernels.experiments.sweep import run_sweep
    from mmkernels.experiments.table4 import run_table4

    _check_memory_budget_setting(args)
    _check_options(args)
    if args.quick:
        args.seeds, args.epochs = min(args.seeds, 2), min(args.epochs, 30)
    if args.iemocap:
        args.iemocap = str(Path(args.iemocap).resolve())
    cfg = _sweep_config(args)
    jobs = [(_prepared(args, f"--bundled {name}", lambda n=name: load_bundled(n), name), cfg)
            for name in args.bundled]
    if args.iemocap:
        jobs.append((_prepared(args, f"--iemocap {args.iemocap}",
                               lambda: load_iemocap(args.iemocap), "iemocap"),
                     _sweep_config(args, fusion="late")))
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmkernels.cpu_memory import enable_allocation_cache

    enable_allocation_cache()  # training steps reuse their large tensors' pages
    progress = not args.no_progress
    record = {"subcommand": "reproduce",
              "options": {k: getattr(args, k) for k in _REPRODUCE_OPTIONS}}
    with _results_folder(args, record) as store:
        t0 = time.perf_counter()
        t4_seeds = list(range(args.table4_seeds))
        t4 = run_table4(seeds=t4_seeds, n_train=args.n_train, n_test=args.n_test,
                        progress=progress)
        real = []
        with _executor(args) as ex:
            for data, c in jobs:
                recs = run_sweep(data, c, progress=progress, store=store, executor=ex,
                                 device=args.device)
                _report_diverged(args, recs, c)
                real.append(RealResult(data, c, recs))
        runtime = time.perf_counter() - t0
        config = {"command": ["mmkernels", *args.argv], "subcommand": "reproduce",
                  "quick": args.quick, "table4": {"seeds": t4_seeds, "n_train": args.n_train,
                                                  "n_test": args.n_test, "recipe": "mix",
                                                  "overlaps": [1.0, 0.8, 0.5, 0.2, 0.0]},
                  "real": {r.data.name: r.cfg.to_dict() for r in real},
                  "iemocap": args.iemocap, "device": args.device}
        report = write_results(args.out, table4_rows=t4, real=real, config=config,
                               runtime_s=runtime,
                               title="mmkernels reproduce: Huang et al. 2021")
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
        record = json.loads(saved_path.read_text())
        saved = record["options"]
        if not isinstance(saved, dict):
            raise TypeError("options is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--resume {args.resume}: unreadable sweep.json ({exc})") from None
    if record.get("subcommand", "sweep") != "sweep":
        raise SystemExit(f"--resume {args.resume}: it holds the results of `mmkernels "
                         f"{record['subcommand']}`; run that command again to resume it")
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
    ``--resume DIR`` continues the sweep saved in DIR.

    Nothing in OUT changes until every option has been checked, the data loaded and
    validated, and OUT's store lock taken (see _results_folder): a refused or failing run
    leaves a saved sweep exactly as it was."""
    from mmkernels.experiments.data import MultiModalDataset
    from mmkernels.experiments.report import RealResult, write_results
    from mmkernels.experiments.sweep import run_sweep

    _check_memory_budget_setting(args)
    if args.resume:
        _resume_options(args)
    elif args.data is None:
        raise SystemExit("mmkernels sweep: give --data FILE.npz (or --resume DIR)")
    else:
        args.data = str(Path(args.data).resolve())
    _check_options(args)
    cfg = _sweep_config(args)
    name = args.name or Path(args.data).stem
    from mmkernels.experiments.sweep import MAX_MODALITIES

    data = _prepared(args, f"--data {args.data}",
                     lambda: MultiModalDataset.load(args.data, max_modalities=MAX_MODALITIES),
                     name, split_seed=args.split_seed, test_size=args.test_size,
                     standardize=not args.no_standardize)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmkernels.cpu_memory import enable_allocation_cache

    enable_allocation_cache()  # training steps reuse their large tensors' pages
    record = {"subcommand": "sweep", "options": {k: getattr(args, k) for k in _SWEEP_OPTIONS}}
    with _results_folder(args, record) as store:
        t0 = time.perf_counter()
        with _executor(args) as ex:
            recs = run_sweep(data, cfg, progress=not args.no_progress, store=store,
                             executor=ex, device=args.device)
        _report_diverged(args, recs, cfg)
        runtime = time.perf_counter() - t0
        config = {"command": ["mmkernels", *args.argv], "subcommand": "sweep",
                  "data": str(args.data), "name": name, "split_seed": args.split_seed,
                  "test_size": args.test_size, "standardize": not args.no_standardize,
                  "executor": args.executor, "device": args.device, "sweep": cfg.to_dict()}
        report = write_results(args.out, real=[RealResult(data, cfg, recs)], config=config,
                               runtime_s=runtime, title=f"mmkernels sweep: {name}")
    _print_claims(args.out)
    print(f"report: {report} ({runtime:.1f} s)")
    return 0


def _run(args: argparse.Namespace) -> int:
    """A sweep or reproduce whose expected failures end in one line on stderr (what
    happened, the cells stored, the command that resumes) and a non-zero status instead of
    a traceback: the lock held by another sweep, a full or read-only disk, the memory
    budget, Ctrl-C."""
    from mmkernels.experiments.store import StoreBusyError
    from mmkernels.memory import MemoryBudgetError

    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(_stopped(args, "interrupted"), file=sys.stderr)
        return 130
    except (StoreBusyError, MemoryBudgetError) as exc:
        print(_stopped(args, str(exc)), file=sys.stderr)
        return 1
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "")
        what = exc.strerror or str(exc)
        what = f"cannot write {exc.filename}: {what}" if exc.filename else what
        print(_stopped(args, f"{what}{f' ({code})' if code else ''}"), file=sys.stderr)
        return 1


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
    p.add_argument("--table4-seeds", type=int, default=5,
                   help="seeds of Table 4 (default 5); its cells are closed-form float64 ridge "
                        "fits from one Gram matrix, computed on the CPU whatever --device says")
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
    if args.command in ("sweep", "reproduce"):
        return _run(args)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
