"""The paper's experiments and the same protocol on any data.

    sweep     SweepConfig, prepare, run_cell, run_sweep (resumable), laziness_probe
    executors RayExecutor; any concurrent.futures-style executor runs cells
    store     the append-only results store (records.jsonl) and read_records
    provenance versions of everything that produced a result
    table4    synthetic overlap experiment (Table 4) and its acceptance check
    sampling  the stratified training-fraction rule (Table 2)
    shapley   exact Shapley values of modalities over all subsets
    tables    mean ± std aggregation: Tables 1-3, uni-modal, Shapley, laziness, Table 4
    figures   PNG figures in the paper's form (matplotlib Agg)
    report    the results folder: CSV/JSON per seed and aggregated, report.md, claims
    io        atomic file writers
    cli       the `mmkernels` console script (reproduce, sweep, demo, bench, info)
"""
