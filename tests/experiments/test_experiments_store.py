"""The append-only results store: records, torn and damaged lines, the writer's lock, and a
sweep that meets a torn record."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from test_experiments_tables import tiny_dataset

from mmkernels.experiments.store import RECORDS_FILE, ResultStore, read_records
from mmkernels.experiments.sweep import SweepConfig, prepare, run_sweep


def _records(n: int) -> list[dict]:
    return [{"key": f"k{i}", "seed": i, "metrics": {"acc": 0.5 + i / 100, "nan": float("nan")}}
            for i in range(n)]


def _write(folder: Path, recs: list[dict]) -> None:
    with ResultStore(folder).writer() as w:
        for r in recs:
            w.append(r)


def test_append_and_read_back(tmp_path: Path) -> None:
    _write(tmp_path, _records(3))
    got = read_records(tmp_path)
    assert [r["key"] for r in got] == ["k0", "k1", "k2"]
    assert got[1]["metrics"] == {"acc": 0.51, "nan": None}  # NaN stored as null
    lines = (tmp_path / RECORDS_FILE).read_bytes().split(b"\n")
    assert len(lines) == 4 and lines[-1] == b""  # one line per record
    _write(tmp_path, _records(5)[3:])  # a second writer appends
    assert [r["key"] for r in read_records(tmp_path)] == [f"k{i}" for i in range(5)]
    assert set(ResultStore(tmp_path).records()) == {f"k{i}" for i in range(5)}


def test_missing_store_reads_empty(tmp_path: Path) -> None:
    assert read_records(tmp_path / "nothing") == []


@pytest.mark.parametrize("cut", [1, 20, -1])
def test_torn_last_record_is_detected_and_cut(tmp_path: Path, cut: int) -> None:
    _write(tmp_path, _records(3))
    path = tmp_path / RECORDS_FILE
    data = path.read_bytes()
    last = data.rfind(b"\n", 0, len(data) - 1) + 1
    torn = data[last:len(data) - 1] if cut == -1 else data[last:last + cut]
    path.write_bytes(data[:last] + torn)  # a write killed mid-record
    assert [r["key"] for r in read_records(tmp_path)] == ["k0", "k1"]  # readers skip it
    with pytest.warns(UserWarning, match="torn"), ResultStore(tmp_path).writer() as w:
        w.append(_records(3)[2])  # the cell, run again
    assert path.read_bytes() == data
    kept = (tmp_path / "records.torn").read_bytes()
    assert torn in kept  # the torn bytes are moved aside, not deleted


def test_damaged_record_is_skipped_and_its_cell_redone(tmp_path: Path) -> None:
    _write(tmp_path, _records(3))
    path = tmp_path / RECORDS_FILE
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"acc": 0.51', b'"acc": 0.61'))  # a flipped digit
    assert [r["key"] for r in read_records(tmp_path)] == ["k0", "k2"]  # checksum catches it
    with pytest.warns(UserWarning, match="damaged record"), ResultStore(tmp_path).writer() as w:
        w.append(_records(3)[1])
    assert [r["key"] for r in read_records(tmp_path)] == ["k0", "k2", "k1"]


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    with ResultStore(tmp_path).writer():
        with pytest.raises(RuntimeError, match="in use by another sweep"), \
                ResultStore(tmp_path).writer():
            pass
    with ResultStore(tmp_path).writer() as w:  # released when the first closed
        w.append({"key": "x"})


def test_readable_while_written(tmp_path: Path) -> None:
    with ResultStore(tmp_path).writer() as w:
        w.append({"key": "a"})
        assert [r["key"] for r in read_records(tmp_path)] == ["a"]
        w.append({"key": "b"})
        assert [r["key"] for r in read_records(tmp_path)] == ["a", "b"]


def test_record_without_key_is_refused(tmp_path: Path) -> None:
    with ResultStore(tmp_path).writer() as w, pytest.raises(ValueError, match="'key'"):
        w.append({"seed": 1})


def test_sweep_redoes_a_torn_cell_only(tmp_path: Path, monkeypatch) -> None:
    from mmkernels.experiments import sweep as sw

    data = prepare(tiny_dataset(n=45), "tiny")
    cfg = SweepConfig(hidden=4, epochs=1, seeds=[0, 1], fractions=[1.0], probe=False)
    full = run_sweep(data, cfg, progress=False, store=tmp_path)
    path = tmp_path / RECORDS_FILE
    data_bytes = path.read_bytes()
    path.write_bytes(data_bytes[:-40])  # tear the second cell's record
    ran = []
    real = sw.run_cell
    monkeypatch.setattr(sw, "run_cell", lambda d, s, f, c: ran.append(s) or real(d, s, f, c))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = run_sweep(data, cfg, progress=False, store=tmp_path)
    assert ran == [1] and again == full
    recs = read_records(tmp_path)
    assert [r["seed"] for r in recs] == [0, 1]
    assert {"versions", "runtime_s", "config", "data", "finished_utc"} <= set(recs[0])
    assert json.loads(json.dumps(recs[1]["records"])) == recs[1]["records"]


def test_start_over_keeps_every_old_store_and_respects_the_lock(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    assert store.start_over() is None  # nothing to keep
    kept = []
    for i in range(2):  # twice in the same second: two distinct names, nothing replaced
        _write(tmp_path, [{"key": f"run{i}"}])
        kept.append(store.start_over())
    assert len(set(kept)) == 2 and not (tmp_path / RECORDS_FILE).exists()
    assert [json.loads(p.read_text())["key"] for p in kept] == ["run0", "run1"]
    with store.writer(), pytest.raises(RuntimeError, match="in use by another sweep"):
        ResultStore(tmp_path).start_over()  # a running sweep's records are never renamed
    with store.writer(), pytest.raises(RuntimeError, match="records are being written"):
        store.start_over()  # not by the sweep itself either


def test_store_warnings_name_the_caller_not_contextlib(tmp_path: Path) -> None:
    _write(tmp_path, _records(2))
    path = tmp_path / RECORDS_FILE
    path.write_bytes(path.read_bytes()[:-5])  # torn
    with pytest.warns(UserWarning, match="torn") as caught, ResultStore(tmp_path).writer():
        pass
    assert caught[0].filename == __file__


def test_records_keep_their_field_order(tmp_path: Path) -> None:
    """The CSV columns of a resumed sweep come from stored records: they must be in the
    order the cell made them, not sorted."""
    _write(tmp_path, [{"key": "k", "zeta": 1, "alpha": {"z": 1, "a": 2}}])
    rec = read_records(tmp_path)[0]
    assert list(rec) == ["key", "zeta", "alpha", "sha256"] and list(rec["alpha"]) == ["z", "a"]
    old = {"key": "s", "b": 1, "a": 2}  # a line an older version wrote (sorted keys) still reads
    body = json.dumps(dict(sorted(old.items())), sort_keys=True)
    import hashlib

    old["sha256"] = hashlib.sha256(body.encode()).hexdigest()
    with open(tmp_path / RECORDS_FILE, "a") as f:
        f.write(json.dumps(old, sort_keys=True) + "\n")
    assert [r["key"] for r in read_records(tmp_path)] == ["k", "s"]


def test_resumed_sweep_writes_the_same_csv_columns(tmp_path: Path) -> None:
    from mmkernels.experiments.report import RealResult, write_results

    data = prepare(tiny_dataset(n=45), "tiny")
    cfg = SweepConfig(hidden=4, epochs=1, seeds=[0], fractions=[1.0], probe=False)
    fresh = run_sweep(data, cfg, progress=False, store=tmp_path / "s")
    resumed = run_sweep(data, cfg, progress=False, store=tmp_path / "s")
    for name, recs in (("a", fresh), ("b", resumed)):
        write_results(tmp_path / name, real=[RealResult(data, cfg, recs)])
    for csv_name in ("tiny_subsets_per_seed.csv", "tiny_refit_per_seed.csv"):
        assert (tmp_path / "a" / csv_name).read_text() == (tmp_path / "b" / csv_name).read_text()


def test_a_fifo_is_not_a_store(tmp_path: Path) -> None:
    import os
    import signal

    def hang(*_):
        raise TimeoutError("blocked on the FIFO")

    os.mkfifo(tmp_path / RECORDS_FILE)  # reading it would block forever
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            read_records(tmp_path)
        with pytest.raises(ValueError, match="not a regular file"), \
                ResultStore(tmp_path).writer():
            pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_the_lock_is_reentrant_for_its_store_only(tmp_path: Path) -> None:
    from mmkernels.experiments.store import StoreBusyError

    store = ResultStore(tmp_path)
    with store.locked():
        with store.writer() as w:  # the holder appends under its own lock
            w.append({"key": "a"})
        with pytest.raises(StoreBusyError, match="in use by another sweep"):
            with ResultStore(tmp_path).writer():
                pass
        assert store.start_over() is not None
    with ResultStore(tmp_path).writer():  # released
        pass
