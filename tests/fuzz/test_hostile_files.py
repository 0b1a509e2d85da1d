"""Malformed and hostile files: every loader refuses them with a clear ValueError naming the
file, never a crash, a hang, another exception type, or an allocation the file does not hold.

Mutation fuzzing and the crafted pickles run in child processes (file_fuzz.py) under an
address-space limit. MMKERNELS_FUZZ_FILES sets the mutants per file kind (default 300).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from file_fuzz import HOSTILE_PICKLES, HOSTILE_SECONDS, KINDS, mutate, odd_files

from mmkernels.experiments.data import MultiModalDataset, load_iemocap
from mmkernels.experiments.data.dataset import TooManyModalitiesError
from mmkernels.experiments.store import RECORDS_FILE, ResultStore, read_records
from mmkernels.memory import MemoryBudgetError

HERE = Path(__file__).resolve().parent
CASES = int(os.environ.get("MMKERNELS_FUZZ_FILES", "300"))


def _child(args: list[str], workdir: Path, timeout: float = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), str(HERE)])}
    proc = subprocess.run([sys.executable, str(HERE / "file_fuzz.py"), *args, str(workdir)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        current = workdir / "current"
        case = current.read_text() if current.exists() else "before the first case"
        how = (f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit {proc.returncode}")
        pytest.fail(f"file_fuzz {args} died ({how}) on case {case}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_files_are_loaded_or_refused_clearly(kind: str, tmp_path: Path) -> None:
    res = _child([kind, "0", str(CASES)], tmp_path)
    assert res["findings"] == [] and res["bad"] == 0, res
    assert res["loaded"] + res["refused"] == CASES
    assert res["refused"] > CASES // 2  # the mutations do reach the loaders' checks


def test_pickles_that_ask_for_gigabytes_or_minutes_are_refused(tmp_path: Path) -> None:
    got = _child(["hostile", "0", "0"], tmp_path)
    for name, (_, says) in HOSTILE_PICKLES.items():
        result = got[name]["result"]
        assert "Error" in result and says in result, (name, result)
        assert str(tmp_path / "hostile.pkl") in result
        assert got[name]["seconds"] < HOSTILE_SECONDS, (name, got[name])


def test_odd_files_are_refused_by_name(tmp_path: Path) -> None:
    got = _child(["odd", "0", "0"], tmp_path)
    for name, (_, path, says) in odd_files(tmp_path).items():
        error = got[name]["error"]
        assert got[name]["value_error"], (name, error)
        assert str(path) in error and says in error, (name, error)


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npz_header_claiming_more_than_the_member_holds(tmp_path: Path) -> None:
    path = tmp_path / "lies.npz"
    MultiModalDataset({"a": np.ones((4, 2), np.float32)}, np.arange(4) % 2,
                      task="classification").save(path)
    with zipfile.ZipFile(path, "a") as z:  # a second "labels" member would be ambiguous
        z.writestr("extra.npy", _npy_header((10**12,)) + b"\0" * 8)
    with pytest.raises(ValueError, match=r"lies.npz.*'extra.npy'.*declares shape "
                                         r"\[1000000000000\].*holds"):
        MultiModalDataset.load(path)


def test_too_many_modalities_refused_before_any_member_is_read(tmp_path: Path,
                                                              monkeypatch) -> None:
    path = tmp_path / "many.npz"
    MultiModalDataset({f"m{k}": np.ones((8, 3), np.float32) for k in range(24)},
                      np.arange(8) % 2, task="classification").save(path, compress=True)

    def no_member(*args, **kwargs):
        raise AssertionError("a member was opened before the modality count was checked")

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "open", no_member)
        with pytest.raises(TooManyModalitiesError,
                           match=r"many.npz: 24 modalities; at most 20 are taken here"):
            MultiModalDataset.load(path, max_modalities=20)
    assert MultiModalDataset.load(path, max_modalities=24).n_modalities == 24


def test_small_file_expanding_past_the_budget(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "bomb.npz"
    MultiModalDataset({"a": np.zeros((1 << 20, 16), np.float32)}, np.zeros(1 << 20, np.int64),
                      task="classification").save(path, compress=True)
    assert path.stat().st_size < (1 << 20)  # 72 MiB of arrays in under 1 MiB
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "16M")
    with pytest.raises(MemoryBudgetError, match=r"bomb.npz: loading 3 arrays needs 72.0 MiB "
                                                r"\(754\d{5} bytes\), more than the memory budget "
                                                r"of 16.0 MiB"):
        MultiModalDataset.load(path)
    monkeypatch.delenv("MMKERNELS_MEMORY_BUDGET")
    assert MultiModalDataset.load(path).n == 1 << 20


def _conversations(text_value: object, train: list[str]) -> tuple:
    labels = {"c1": [0, 1], "c2": [2]}
    feats = {"c1": np.ones((2, 3), np.float32), "c2": np.ones((1, 3), np.float32)}
    text = {"c1": text_value, "c2": feats["c2"]}
    names = {"c1": ["a", "b"], "c2": ["c"]}
    return names, names, labels, text, feats, feats, names, train, ["c2"]


def test_memo_references_cannot_multiply_features(tmp_path: Path, monkeypatch) -> None:
    row = np.ones(1 << 14, np.float32)  # 64 KiB, referenced 100,000 times: 6.1 GiB
    path = tmp_path / "amplified.pkl"
    path.write_bytes(pickle.dumps(_conversations([row] * 100_000, ["c1"]), protocol=2))
    assert path.stat().st_size < (1 << 20)
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "1G")
    with pytest.raises(MemoryBudgetError, match=r"amplified.pkl: the features up to "
                                                r".*videoText\['c1'\] needs 6.1 GiB"):
        load_iemocap(path)
    path.write_bytes(pickle.dumps(_conversations(np.ones((2, 3)), ["c1", "c1"]), protocol=2))
    with pytest.raises(ValueError, match="trainVid lists a conversation more than once"):
        load_iemocap(path)


def test_store_survives_any_damage(tmp_path: Path) -> None:
    with ResultStore(tmp_path).writer() as w:
        for i in range(6):
            w.append({"key": f"k{i}", "metrics": {"acc": i / 7, "name": "é\n"}})
    path = tmp_path / RECORDS_FILE
    original = {r["key"]: r for r in read_records(tmp_path)}
    clean = path.read_bytes()
    rng = np.random.default_rng(0)
    for _ in range(CASES):
        path.write_bytes(mutate(clean, rng))
        recs = read_records(tmp_path)  # never raises, returns only intact records
        assert all(original.get(r["key"]) == r for r in recs)
        with pytest.warns(UserWarning) if path.read_bytes() != clean else nullcontext(), \
                ResultStore(tmp_path).writer():
            pass
        data = path.read_bytes()  # repaired: only whole lines remain
        assert data == b"" or data.endswith(b"\n")
        assert read_records(tmp_path) == recs



def test_npz_with_a_foreign_member_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "annotated.npz"
    MultiModalDataset({"a": np.ones((4, 2), np.float32)}, np.arange(4) % 2,
                      task="classification").save(path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("README.txt", "added by another tool")
    assert MultiModalDataset.load(path).n == 4


def test_features_that_are_not_numbers_are_refused_before_conversion(tmp_path: Path) -> None:
    path = tmp_path / "ranges.pkl"  # a memoised range(2**24), 1000 times: 64 GiB as float32
    path.write_bytes(pickle.dumps(_conversations([range(1 << 24)] * 1000, ["c1"]), protocol=2)
                     .replace(b"c__builtin__\nrange", b"c__builtin__\nxrange"))
    with pytest.raises(ValueError, match=r"ranges.pkl: videoText\['c1'\]: expected numeric "
                                         r"features .* got range"):
        load_iemocap(path)
