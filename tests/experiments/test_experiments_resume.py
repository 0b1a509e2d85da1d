"""`mmkernels sweep` killed with SIGKILL midway, its last record torn, then `--resume`: it ends
with exactly the records of an uninterrupted run, none lost and none duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from test_experiments_tables import tiny_dataset

from mmkernels.experiments.cli import main
from mmkernels.experiments.store import RECORDS_FILE, read_records

REPO = Path(__file__).resolve().parents[2]
SEEDS = 6
OPTIONS = ["--seeds", str(SEEDS), "--epochs", "40", "--hidden", "8", "--fractions", "0.5", "1",
           "--no-probe", "--no-progress"]


def _cells(folder: Path) -> dict[str, dict]:
    return {r["key"]: r["records"] for r in read_records(folder)}


def _keys(folder: Path) -> list[str]:
    return [r["key"] for r in read_records(folder)]


def test_killed_sweep_resumes_to_the_uninterrupted_records(tmp_path: Path) -> None:
    data = tmp_path / "mine.npz"
    tiny_dataset(n=300).save(data)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["sweep", "--data", str(data), "--out", str(whole), *OPTIONS]) == 0
    expected = _cells(whole)
    assert len(expected) == 2 * SEEDS

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-m", "mmkernels", "sweep", "--data", str(data),
                             "--out", str(killed), *OPTIONS], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(read_records(killed)) < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the sweep ended before it could be killed: {proc.stderr.read()!r}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = _keys(killed)
    assert 3 <= len(finished) < 2 * SEEDS, "the kill must land midway"

    # Tear the last record as a kill inside its write would.
    path = killed / RECORDS_FILE
    raw = path.read_bytes()
    path.write_bytes(raw[:raw.rfind(b"\n", 0, len(raw) - 1) + 1] + raw[-200:-100])
    assert _keys(killed) == finished[:-1]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["sweep", "--resume", str(killed), "--no-progress"]) == 0
    assert any("torn" in str(w.message) for w in caught)
    keys = _keys(killed)
    assert len(keys) == len(set(keys)), "duplicated records"
    assert _cells(killed) == expected
    assert keys[:len(finished) - 1] == finished[:-1]  # finished cells kept, not redone
    assert (killed / "records.torn").exists()
    assert (killed / "report.md").exists()


def test_resume_refuses_a_contradicting_option(tmp_path: Path) -> None:
    data = tmp_path / "mine.npz"
    tiny_dataset(n=60).save(data)
    out = tmp_path / "r"
    assert main(["sweep", "--data", str(data), "--out", str(out), "--seeds", "1",
                 "--epochs", "1", "--hidden", "4", "--fractions", "1", "--no-progress"]) == 0
    with pytest.raises(SystemExit, match="--epochs 5 differs from the saved sweep's 1"):
        main(["sweep", "--resume", str(out), "--epochs", "5"])
    with pytest.raises(SystemExit, match="--epochs 50 differs"):  # typed, though the default
        main(["sweep", "--resume", str(out), "--epochs", "50"])
    with pytest.raises(SystemExit, match="--out cannot be combined with --resume"):
        main(["sweep", "--resume", str(out), "--out", str(tmp_path / "elsewhere")])
    with pytest.raises(SystemExit, match="--workers applies to --executor ray only"):
        main(["sweep", "--resume", str(out), "--workers", "2"])
    with pytest.raises(SystemExit, match="no sweep.json"):
        main(["sweep", "--resume", str(tmp_path)])
    with pytest.raises(SystemExit, match="--data"):
        main(["sweep", "--out", str(out)])
    n = len(read_records(out))
    rel = os.path.relpath(data)  # the same file, named relatively: not a contradiction
    assert main(["sweep", "--resume", str(out), "--epochs", "1", "--data", rel,
                 "--no-progress"]) == 0
    assert len(read_records(out)) == n  # nothing left to run


def test_fresh_keeps_the_old_records(tmp_path: Path) -> None:
    data = tmp_path / "mine.npz"
    tiny_dataset(n=60).save(data)
    out = tmp_path / "r"
    args = ["sweep", "--data", str(data), "--out", str(out), "--seeds", "1", "--epochs", "1",
            "--hidden", "4", "--fractions", "1", "--no-progress"]
    assert main(args) == 0
    assert main([*args, "--fresh"]) == 0
    renamed = list(out.glob("records.*Z.jsonl"))
    assert len(renamed) == 1 and len(read_records(out)) == 1  # the old store kept, renamed
    (out / "old").mkdir()
    renamed[0].rename(out / "old" / RECORDS_FILE)
    assert _cells(out / "old") == _cells(out)  # the same seed gives the same cell
