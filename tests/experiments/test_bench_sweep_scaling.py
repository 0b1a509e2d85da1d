"""`mmkernels bench sweep-scaling` runs end to end at a tiny size, its phase clocks wrapping
every native op the refits call."""

import json

from mmkernels.experiments.bench import sweep_scaling


def test_scaling_part_runs_and_times_every_phase(tmp_path):
    assert sweep_scaling.main(["--skip", "cell", "baselines", "--max-k", "3",
                               "--scaling-epochs", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sweep_scaling.json").read_text())
    assert [r["K"] for r in res["scaling"]] == [2, 3]
    for row in res["scaling"]:
        assert row["train_s"] > 0 and row["refit_s"] > 0
        # the refits' head op and L-BFGS directions ran inside the timed refits
        assert 0 < row["op_s"] < row["refit_s"] + row["probe_s"]
        assert 0 < row["direction_s"] < row["refit_s"] + row["probe_s"]
    assert (tmp_path / "sweep_scaling.png").stat().st_size > 0
