"""Property: any `mmkernels sweep` with at least one nonsense setting is refused with one line
naming a setting, before a cell runs, and leaves the saved results folder exactly as it was
(every byte and mode), whatever the other options are."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from test_experiments_refused_runs import snapshot  # noqa: E402
from test_experiments_tables import tiny_dataset  # noqa: E402

from mmkernels.experiments import sweep as sw  # noqa: E402
from mmkernels.experiments.cli import main  # noqa: E402

SAVED = ["--seeds", "1", "--epochs", "1", "--hidden", "4", "--fractions", "0.5", "1",
         "--no-probe", "--no-progress"]
BAD = {
    "--hidden": ["0", "-3"], "--epochs": ["0", "-1"], "--batch-size": ["0"],
    "--seeds": ["0", "-1"], "--fractions": ["-0.5", "nan", "0", "1.5", "inf"],
    "--refit-fractions": ["0.3", "nan"], "--lr": ["0", "-1", "nan", "inf"],
    "--weight-decay": ["-1", "nan", "inf"], "--head-l2": ["-1", "nan"],
    "--test-size": ["0", "1", "1.5", "-0.1"], "--threads": ["-1"], "--split-seed": ["-1"],
    "--name": ["", "..", "a/b"], "--out": [""], "--data": ["{root}/missing.npz"],
    "MMKERNELS_MEMORY_BUDGET": ["0", "lots", "-5G"],
}
GOOD = {"--hidden": ["2", "4", "8"], "--epochs": ["1", "2"], "--seeds": ["1", "2"],
        "--fractions": ["1", "0.5 1"], "--lr": ["0.01", "0.1"], "--batch-size": ["16", "2048"],
        "--fusion": ["late", "early"], "--threads": ["0", "1"], "--test-size": ["0.3"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "mine.npz"
    tiny_dataset(n=60).save(data)
    out = root / "out"
    assert main(["sweep", "--data", str(data), "--out", str(out), *SAVED]) == 0
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
    return data, out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.lists(st.sampled_from(sorted((k, v) for k, vs in BAD.items() for v in vs)),
                    min_size=1, max_size=3, unique_by=lambda kv: kv[0]),
       good=st.dictionaries(st.sampled_from(sorted(GOOD)), st.integers(0, 2), max_size=4))
def test_nonsense_settings_change_nothing(saved, bad, good) -> None:
    data, out = saved
    before = snapshot(out)
    options = {k: GOOD[k][i % len(GOOD[k])] for k, i in good.items()}
    env = {}
    for key, value in bad:
        value = value.format(root=out.parent)
        if key.startswith("--"):
            options[key] = value
        else:
            env[key] = value
    argv = ["sweep", "--data", str(data), "--out", str(out), *SAVED]
    for key, value in options.items():
        argv += [key, *value.split()] if key not in ("--out", "--name") else [key, value]
    ran = []
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setattr(sw, "run_cell", lambda *a: ran.append(a))
        with pytest.raises(SystemExit) as refused:
            main(argv)
    message = str(refused.value.code)
    assert message.startswith("mmkernels sweep: ") and "\n" not in message, message
    assert not ran and snapshot(out) == before, (argv, env, message)
