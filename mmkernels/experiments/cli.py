"""The `mmkernels` command (also `python -m mmkernels`).

Subcommands: `demo` (the fused ops on a small multi-modal batch, checked against the
reference, then the CPU benchmark), `bench` (the benchmarks), `info` (the build).
"""

from __future__ import annotations

import argparse
import json

import torch


def demo(args: argparse.Namespace) -> int:
    import mmkernels
    from mmkernels import reference
    from mmkernels.bench.__main__ import main as bench_main
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
    from mmkernels.bench.__main__ import main as bench_main

    return bench_main(args.bench_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmkernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the fused ops on a small batch, then the CPU benchmark")
    p.add_argument("--scale", type=float, default=1.0, help="benchmark batch-size factor")
    p.add_argument("--repeats", type=int, default=7)
    p.set_defaults(fn=demo)
    p = sub.add_parser("bench", help="benchmarks (arguments as python -m mmkernels.bench)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=bench)
    sub.add_parser("info", help="build information").set_defaults(fn=info)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
