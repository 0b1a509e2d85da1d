"""The paper's experiments, sweeps, reports and the `mmkernels` command line."""
