"""A run that is refused, or fails before its first cell, leaves the results folder exactly as
it was (every byte and mode); nonsense settings are refused by name before anything is
written; expected failures (the lock, a full or read-only disk, Ctrl-C) end in one line that
says what happened, how many cells are stored and how to resume."""

from __future__ import annotations

import errno
import json
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_experiments_tables import tiny_dataset

from mmkernels.experiments import sweep as sw
from mmkernels.experiments.cli import main
from mmkernels.experiments.data import MultiModalDataset
from mmkernels.experiments.store import ResultStore, read_records

OPTIONS = ["--seeds", "2", "--epochs", "1", "--hidden", "4", "--fractions", "0.5", "1",
           "--no-probe", "--no-progress"]


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under ``folder``: its bytes (None for a folder) and its mode."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (None if p.is_dir() else p.read_bytes(), st.st_mode)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(data file, the --out folder of one finished sweep on it)."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "mine.npz"
    tiny_dataset(n=60).save(data)
    out = root / "out"
    assert main(["sweep", "--data", str(data), "--out", str(out), *OPTIONS]) == 0
    return data, out


@pytest.fixture
def saved(finished, tmp_path) -> tuple[Path, Path]:
    """A private copy of ``finished``'s results folder (the data file is shared, read-only)."""
    data, out = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return data, copy


def _bad_files(folder: Path) -> dict[str, Path]:
    garbage = folder / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip archive")
    ds = tiny_dataset(n=60)
    huge = {k: v.astype(np.float64) for k, v in ds.modalities.items()}
    huge["text"][3, 1] = 1e39  # finite in float64, inf in the float32 the sweep trains in
    MultiModalDataset(huge, ds.labels, split=ds.split).save(folder / "huge.npz")
    rng = np.random.default_rng(0)
    many = {f"m{k}": rng.normal(size=(40, 1)).astype(np.float32) for k in range(24)}
    MultiModalDataset(many, np.arange(40) % 2,
                      split=np.where(np.arange(40) < 30, "train", "test")).save(
        folder / "many.npz", compress=True)
    return {"garbage": garbage, "huge": folder / "huge.npz", "many": folder / "many.npz"}


# (extra arguments, what the error must say); each replaces the option of OPTIONS it names.
REFUSED = [
    (["--data", "{tmp}/typo.npz"], "no such dataset file"),
    (["--data", "{garbage}"], "garbage.npz: cannot read dataset file"),
    (["--data", "{huge}"], r"huge.npz: modality 'text': 1 value is finite in float64 but "
                           r"overflows float32"),
    (["--data", "{many}"], "many.npz: 24 modalities; at most 20 are taken here"),
    (["--hidden", "0"], "--hidden: expected an int >= 1, got 0"),
    (["--epochs", "0"], "--epochs: expected an int >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size: expected an int >= 1, got 0"),
    (["--seeds", "0"], "--seeds: expected a number of seeds >= 1, got 0"),
    (["--seeds", "-2"], "--seeds: expected a number of seeds >= 1, got -2"),
    (["--fractions", "-0.5"], r"--fractions: expected fractions in \(0, 1\], got -0.5"),
    (["--fractions", "nan"], r"--fractions: expected fractions in \(0, 1\], got nan"),
    (["--fractions", "1.5"], r"--fractions: expected fractions in \(0, 1\], got 1.5"),
    (["--fractions", "0.5", "0.5"], "--fractions: 0.5 is given twice"),
    (["--refit-fractions", "0.3"], r"--refit-fractions: 0.3 is not one of the fractions "
                                   r"\[0.5, 1.0\]"),
    (["--lr", "0"], "--lr: expected a finite number > 0, got 0"),
    (["--lr", "inf"], "--lr: expected a finite number > 0, got inf"),
    (["--weight-decay", "-1"], "--weight-decay: expected a finite number >= 0, got -1"),
    (["--head-l2", "nan"], "--head-l2: expected a finite number >= 0, got nan"),
    (["--test-size", "1.5"], r"--test-size: expected a number in \(0, 1\), got 1.5"),
    (["--test-size", "0"], r"--test-size: expected a number in \(0, 1\), got 0"),
    (["--threads", "-1"], "--threads: expected an int >= 0, got -1"),
    (["--split-seed", "-1"], "--split-seed: expected an int >= 0, got -1"),
    (["--name", "../escape"], "--name: expected a plain file name"),
    (["--workers", "2"], "--workers applies to --executor ray only"),
    (["--executor", "ray", "--cpus-per-cell", "0"], "--cpus-per-cell: expected an int >= 1"),
    (["--executor", "ray", "--gpus-per-cell", "-1"], "--gpus-per-cell: expected a finite"),
    # Issue 18: the same --out with other options would replace the report of the first run.
    (["--device", "tpu"], r'--device: device must be "cpu", "cuda" or "cuda:N"'),
    *([] if torch.cuda.is_available() else
      [(["--device", "cuda"], "--device: device 'cuda': CUDA is not available here")]),
    (["--epochs", "2"], r"holds the results of another sweep \(--epochs 1 there, 2 here\)"),
    (["--seeds", "3"], r"another sweep \(--seeds 2 there, 3 here\)"),
]


def _argv(data: Path, out: Path, extra: list[str], files: dict[str, Path]) -> list[str]:
    subs = {"tmp": str(out.parent), **{k: str(v) for k, v in files.items()}}
    extra = [a.format(**subs) for a in extra]
    given = {a for a in extra if a.startswith("--")}
    base, i = [], 0
    while i < len(OPTIONS):  # drop the options that ``extra`` replaces, with their values
        if OPTIONS[i] in given:
            i += 1
            while i < len(OPTIONS) and not OPTIONS[i].startswith("--"):
                i += 1
            continue
        base.append(OPTIONS[i])
        i += 1
    if "--data" not in given:
        extra = ["--data", str(data), *extra]
    return ["sweep", "--out", str(out), *base, *extra]


@pytest.mark.parametrize("extra, says", REFUSED, ids=[" ".join(e) for e, _ in REFUSED])
def test_refused_run_leaves_the_folder_as_it_was(saved, extra, says, monkeypatch) -> None:
    data, out = saved
    files = _bad_files(out.parent)
    before = snapshot(out)
    ran = []
    monkeypatch.setattr(sw, "run_cell", lambda *a: ran.append(a))
    t0 = time.perf_counter()
    with pytest.raises(SystemExit, match=says):
        main(_argv(data, out, extra, files))
    assert time.perf_counter() - t0 < 20  # refused at once (24 modalities once took 38 s)
    assert not ran
    assert snapshot(out) == before


@pytest.mark.parametrize("extra, says", REFUSED[:4] + REFUSED[4:-2:3],
                         ids=[" ".join(e) for e, _ in REFUSED[:4] + REFUSED[4:-2:3]])
def test_refused_run_creates_no_folder(tmp_path, finished, extra, says) -> None:
    data, _ = finished
    files = _bad_files(tmp_path)
    out = tmp_path / "new"
    with pytest.raises(SystemExit, match=says):
        main(_argv(data, out, extra, files))
    assert not out.exists()


@pytest.mark.parametrize("value, says", [("0", "must be a byte count"),
                                         ("lots", "must be a byte count")])
def test_memory_budget_setting_is_checked_first(saved, monkeypatch, value, says) -> None:
    data, out = saved
    before = snapshot(out)
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", value)
    with pytest.raises(SystemExit, match=rf"MMKERNELS_MEMORY_BUDGET.*{says}"):
        main(["sweep", "--data", str(data), "--out", str(out), *OPTIONS])
    assert snapshot(out) == before


def test_out_must_be_a_folder_name(tmp_path, finished, monkeypatch) -> None:
    data, _ = finished
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--out: expected a folder, got ''"):
        main(["sweep", "--data", str(data), "--out", "", *OPTIONS])
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(SystemExit, match="--out .*a-file is a file, not a folder"):
        main(["sweep", "--data", str(data), "--out", str(tmp_path / "a-file"), *OPTIONS])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_run_refused_by_the_lock_changes_nothing(saved, capsys) -> None:
    data, out = saved
    before = snapshot(out)
    n = len(read_records(out))
    with ResultStore(out).writer():  # another sweep is running in OUT
        for argv in (["sweep", "--data", str(data), "--out", str(out), *OPTIONS],
                     ["sweep", "--data", str(data), "--out", str(out), *OPTIONS, "--fresh"],
                     ["sweep", "--resume", str(out), "--no-progress"]):
            assert main(argv) == 1
            err = capsys.readouterr().err
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert "in use by another sweep" in err and f"{n} cells are stored" in err
            assert f"mmkernels sweep --resume {out}" in err
            assert snapshot(out) == before
    # The scenario: other options while the lock is held must not replace sweep.json.
    with ResultStore(out).writer(), pytest.raises(SystemExit, match="another sweep"):
        main(["sweep", "--data", str(data), "--out", str(out), *OPTIONS[2:], "--seeds", "5"])
    assert snapshot(out) == before


def test_rerun_with_the_same_options_is_a_resume(saved) -> None:
    data, out = saved
    n = len(read_records(out))
    saved_json = (out / "sweep.json").read_bytes()
    assert main(["sweep", "--data", str(data), "--out", str(out), *OPTIONS,
                 "--threads", "1"]) == 0  # where cells run may differ
    assert len(read_records(out)) == n and (out / "sweep.json").read_bytes() == saved_json


def test_result_files_are_readable_by_the_group(finished) -> None:
    _, out = finished
    for p in out.iterdir():
        mode = stat.S_IMODE(p.stat().st_mode)
        if p.is_file():
            assert mode & 0o044 == 0o044, (p.name, oct(mode))


def _fail_after(monkeypatch, n: int, exc: BaseException, where: str) -> None:
    """Raise ``exc`` in the (n + 1)-th cell ("cell") or the (n + 1)-th store append."""
    from mmkernels.experiments.store import StoreWriter

    owner, name = (sw, "run_cell") if where == "cell" else (StoreWriter, "append")
    real = getattr(owner, name)
    calls = []

    def failing(*args):
        if len(calls) == n:
            raise exc
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("exc, where, code, says", [
    (KeyboardInterrupt(), "cell", 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), "append", 1, "No space left on device"),
    (OSError(errno.EROFS, "Read-only file system"), "append", 1, "Read-only file system"),
])
def test_expected_failures_end_in_one_line(tmp_path, finished, monkeypatch, capsys, exc,
                                           where, code, says) -> None:
    data, _ = finished
    out = tmp_path / "out"
    _fail_after(monkeypatch, 2, exc, where)
    assert main(["sweep", "--data", str(data), "--out", str(out), *OPTIONS]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert says in err and "2 cells are stored" in err
    assert f"resume with: mmkernels sweep --resume {out}" in err
    monkeypatch.undo()
    assert main(["sweep", "--resume", str(out), "--no-progress"]) == 0
    assert len(read_records(out)) == 4


def test_disk_errors_outside_cells_end_in_one_line(tmp_path, finished, monkeypatch,
                                                   capsys) -> None:
    from mmkernels.experiments import io as rio

    data, _ = finished
    out = tmp_path / "out"
    real = rio.write_bytes_atomic

    def read_only(path, payload):
        if Path(path).name == "config.json":
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, payload)

    monkeypatch.setattr(rio, "write_bytes_atomic", read_only)
    assert main(["sweep", "--data", str(data), "--out", str(out), *OPTIONS]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot write {out / 'config.json'}: Read-only file system" in err
    assert "4 cells are stored" in err


def test_stale_temporaries_are_cleaned_under_the_lock(saved) -> None:
    data, out = saved
    stray = out / ".config.json.k3j_9x2a.tmp"  # a kill inside an atomic write left it
    stray.write_text("{")
    mine = out / "notes.tmp"  # not one of ours: kept
    mine.write_text("mine")
    assert main(["sweep", "--data", str(data), "--out", str(out), *OPTIONS]) == 0
    assert not stray.exists() and mine.read_text() == "mine"


def test_saved_sweep_json_is_written_only_once_the_run_is_accepted(tmp_path, finished) -> None:
    data, _ = finished
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(["sweep", "--data", str(tmp_path / "typo.npz"), "--out", str(out), *OPTIONS])
    assert not out.exists()
    assert main(["sweep", "--data", str(data), "--out", str(out), *OPTIONS]) == 0
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["options"]["data"] == str(data.resolve())


def test_reproduce_refuses_before_writing_too(tmp_path, capsys) -> None:
    out = tmp_path / "rep"
    quick = ["reproduce", "--out", str(out), "--bundled", "--table4-seeds", "1",
             "--n-train", "300", "--n-test", "100", "--no-progress"]
    assert main(quick) == 0
    before = snapshot(out)
    for extra, says in ((["--n-train", "400"], r"another reproduce \(--n-train 300 there, 400"),
                        (["--iemocap", str(tmp_path / "missing.pkl")], "no such pickle file"),
                        (["--table4-seeds", "0"], "--table4-seeds: expected an int >= 1"),
                        (["--bundled", "nope"], "--bundled: ")):
        with pytest.raises(SystemExit, match=says):
            main([*quick, *extra])
        assert snapshot(out) == before
    with pytest.raises(SystemExit, match="holds the results of `mmkernels reproduce`"):
        main(["sweep", "--resume", str(out)])
    with ResultStore(out).locked():  # another run holds OUT
        assert main(quick) == 1
    err = capsys.readouterr().err
    assert f"resume with: mmkernels reproduce --out {out} --bundled" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("kw, says", [
    ({"hidden": True}, r"hidden: expected an int >= 1, got True"),
    ({"hidden": 2.5}, r"hidden: expected an int >= 1, got 2.5"),
    ({"fusion": "middle"}, r'fusion: expected "late" or "early"'),
    ({"seeds": []}, r"seeds: expected a non-empty list"),
    ({"seeds": [0, 0]}, r"seeds: a seed is given twice"),
    ({"seeds": [-1]}, r"seeds: expected an int >= 0, got -1"),
    ({"fractions": []}, r"fractions: expected a non-empty list"),
    ({"fractions": [0.5], "refit_fractions": [1.0]},
     r"refit_fractions: 1.0 is not one of the fractions"),
    ({"lr": float("nan")}, r"lr: expected a finite number > 0, got nan"),
])
def test_sweep_config_refuses_nonsense(kw, says) -> None:
    with pytest.raises(sw.SweepConfigError, match=rf"SweepConfig\.{says}"):
        sw.SweepConfig(**kw)


def test_sweep_config_refit_fractions_default_to_the_largest() -> None:
    assert sw.SweepConfig(fractions=[0.1, 0.5]).refit_fractions == [0.5]
    assert sw.SweepConfig().refit_fractions == [1.0]
    assert sw.SweepConfig(fractions=[0.5], refit_fractions=[]).refit_fractions == []  # no refits


def test_device_cpu_runs_and_is_recorded(tmp_path, finished) -> None:
    """--device cpu is the default spelled out: the same records, the device in the report's
    configuration and in every stored cell."""
    data, out = finished
    again = tmp_path / "cpu"
    assert main(["sweep", "--data", str(data), "--out", str(again), *OPTIONS,
                 "--device", "cpu"]) == 0

    def records(folder):
        return {r["key"]: r["records"] for r in read_records(folder)}

    assert records(again) == records(out)
    assert {r["device"] for r in read_records(again)} == {"cpu"}
    assert json.loads((again / "config.json").read_text())["device"] == "cpu"
