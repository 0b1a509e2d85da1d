"""Benchmarks against the baselines of docs/design.md: `mmkernels bench --help`."""
