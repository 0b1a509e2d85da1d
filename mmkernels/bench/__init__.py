"""Benchmarks against the baselines of DESIGN.md: `python -m mmkernels.bench --help`."""
