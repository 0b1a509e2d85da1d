"""python -m mmkernels.bench: time the fused ops against their baselines, print a table, write
JSON. Every ratio is measured in the same run on the same tensors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mmkernels.bench.fused_ops import cpu_cases
from mmkernels.bench.timing import machine, median_ms


def run(args: argparse.Namespace) -> dict:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[
        args.dtype
    ]
    results = {"machine": machine(), "dtype": args.dtype, "scale": args.scale, "cases": []}
    cases = cpu_cases(scale=args.scale, dtype=dtype)
    if args.only:
        cases = [c for c in cases if any(name in c.name for name in args.only)]
    header = f"{'case':32} {'runner':12} {'median ms':>10} {'speed-up':>9} {'target':>7}  GFLOP/s"
    print(f"# {results['machine']}\n# dtype {args.dtype}\n{header}")
    for case in cases:
        times = {name: median_ms(fn, repeats=args.repeats) for name, fn in case.runners.items()}
        ours = times["mmkernels"]
        rows = []
        for name, ms in times.items():
            speedup = ms / ours
            target = case.targets.get(name)
            ok = "" if target is None else ("ok" if speedup >= target else "MISS")
            rows.append(
                {
                    "runner": name,
                    "median_ms": ms,
                    "speedup": speedup,
                    "target": target,
                    "gflops": case.gflop / (ms / 1e3),
                }
            )
            tgt = f"{target:.1f}x" if target else ""
            print(
                f"{case.name:32} {name:12} {ms:10.2f} {speedup:8.2f}x {tgt:>7} {ok:4} "
                f"{case.gflop / (ms / 1e3):6.1f}"
            )
        results["cases"].append(
            {"name": case.name, "shapes": case.shapes, "gflop": case.gflop, "runners": rows}
        )
        sys.stdout.flush()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkernels.bench", description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="batch size factor (1.0 = the shapes of the targets)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", help="run only cases whose name contains one of these")
    parser.add_argument("--out", type=Path, default=Path("bench-results/fused_ops_cpu.json"))
    args = parser.parse_args(argv)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
