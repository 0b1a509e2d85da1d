"""mmkernels bench [fused|heads|ensemble|sweep|sweep-scaling] [options] (also python -m
mmkernels.experiments.bench): time a suite against its
baselines, print a table, write JSON. Every ratio is measured in the same run on the same
tensors. Suites: fused (default; the fused ops, --device cpu|cuda), heads (batched head refits
against scikit-learn), ensemble (all-subset training against the sequential loop), sweep
(a 64-cell sweep in-process against a local Ray), sweep-scaling (a sweep cell's phases on a
6-view dataset and against K = 2..8 modalities)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from mmkernels.experiments.bench.fused_ops import Case, cpu_cases
from mmkernels.experiments.bench.timing import interleaved_ms, load_average, machine

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float16": torch.float16,
}


def time_cases(cases: list[Case], repeats: int) -> list[dict]:
    """Each case's runners interleaved (timing.interleaved_ms), with the load average beside."""
    header = f"{'case':32} {'runner':22} {'median ms':>10} {'speed-up':>9} {'target':>7}  GFLOP/s"
    print(header)
    results = []
    for case in cases:
        load_before = load_average()
        times = interleaved_ms(case.runners, repeats=repeats)
        load_after = load_average()
        ours = times["mmkernels"]
        rows = []
        for name, ms in times.items():
            speedup = ms / ours
            target = case.targets.get(name)
            ok = "" if target is None else ("ok" if speedup >= target else "MISS")
            gflops = case.gflop / (ms / 1e3)
            rows.append(
                {
                    "runner": name,
                    "median_ms": ms,
                    "speedup": speedup,
                    "target": target,
                    "gflops": gflops,
                }
            )
            tgt = f"{target:.1f}x" if target else ""
            print(
                f"{case.name:32} {name:22} {ms:10.3f} {speedup:8.2f}x {tgt:>7} {ok:4} {gflops:8.1f}"
            )
        for note in case.notes:
            print(f"{'':32} note: {note}")
        print(f"{'':32} load average {load_before:.2f} before, {load_after:.2f} after")
        results.append(
            {
                "name": case.name,
                "shapes": case.shapes,
                "gflop": case.gflop,
                "notes": case.notes,
                "runners": rows,
                "load_average": [load_before, load_after],
            }
        )
        sys.stdout.flush()
    return results


def run(args: argparse.Namespace) -> dict:
    results: dict = {
        "machine": machine(),
        "dtype": args.dtype,
        "scale": args.scale,
        "device": args.device,
        "allocation_cache": args.allocation_cache,
    }
    print(f"# {results['machine']}\n# device {args.device}, dtype {args.dtype}, allocation "
          f"cache {'on' if args.allocation_cache else 'off'}")
    if args.device == "cpu":
        cases = cpu_cases(scale=args.scale, dtype=DTYPES[args.dtype], compile=args.compile)
    else:
        from mmkernels.experiments.bench.gpu_ops import fp32_rooflines, gpu_cases

        cases, roof = gpu_cases(dtype=DTYPES[args.dtype], scale=args.scale)
        results["roofline"] = roof
        print(
            f"# measured: copy {roof['copy_gbs']:.0f} GB/s, GEMM {roof['gemm_tflops']:.0f} "
            f"TFLOP/s ({args.dtype})"
        )
    if args.only:
        cases = [c for c in cases if any(name in c.name for name in args.only)]
    results["cases"] = time_cases(cases, args.repeats)
    if args.device == "cuda" and (not args.only or any(n in "e_float32" for n in args.only)):
        results["fp32"] = fp32_rooflines(scale=args.scale)
        for row in results["fp32"]:
            print(
                f"# float32 {row['mode']}: {row['median_ms']:.3f} ms, {row['tflops']:.1f} "
                f"TFLOP/s = {row['fraction_of_gemm_rate']:.0%} of the measured GEMM rate"
            )
    if args.device == "cuda" and (not args.only or any(n in "d_softmax_refit" for n in args.only)):
        from mmkernels.experiments.bench.gpu_refit import run_refit

        results["refit"] = run_refit(scale=args.scale)
    return results


SUITES = {"heads": "mmkernels.experiments.bench.heads",
          "ensemble": "mmkernels.experiments.bench.ensemble",
          "sweep": "mmkernels.experiments.bench.sweep",
          "sweep-scaling": "mmkernels.experiments.bench.sweep_scaling"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUITES:
        return importlib.import_module(SUITES[argv[0]]).main(argv[1:])
    if argv and argv[0] == "fused":
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="mmkernels bench [fused]", description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="default: float32 on cpu, bfloat16 on cuda",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="batch size factor (1.0 = the shapes of the targets)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own; on a machine busy with other work "
        "one thread is far less noisy than an OpenMP team waiting for a descheduled member)",
    )
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the torch.compile baseline (its compilation takes minutes on the CPU)",
    )
    parser.add_argument(
        "--allocation-cache",
        action="store_true",
        help="allocate through mmkernels.cpu_memory's cache for the whole run (every runner: "
        "fresh large outputs then reuse mapped pages instead of page-faulting)",
    )
    parser.add_argument("--only", nargs="*", help="run only cases whose name contains one of these")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default bench-results/fused_ops_<device>.json)",
    )
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.allocation_cache:
        from mmkernels.cpu_memory import enable_allocation_cache

        enable_allocation_cache()
    out = args.out or Path(f"bench-results/fused_ops_{args.device}.json")
    results = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"# wrote {out}")
    return 0
