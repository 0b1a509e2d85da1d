"""IEMOCAP loaders on small files written here, and the restricted unpickler under them."""

import os
import pickle
import struct
import subprocess

import numpy as np
import pytest

from mmkernels.experiments.data.iemocap import LABEL_NAMES, detect_format, load_iemocap
from mmkernels.experiments.data.safe_pickle import RefusedGlobalError, safe_load, safe_loads

# Odd widths on purpose: the loaders must read dimensions from the arrays.
DT, DA, DV = 7, 5, 9


def conversation_tuple(rng, n_utts=None, test_ids=("c3",)):
    """A small 9-tuple like the 6-class conversation-level IEMOCAP pickle."""
    n_utts = n_utts or {"c1": 3, "c2": 2, "c3": 4}
    ids, speakers, labels, text, audio, visual, sentences = {}, {}, {}, {}, {}, {}, {}
    for vid, m in n_utts.items():
        ids[vid] = [f"{vid}_u{i}" for i in range(m)]
        speakers[vid] = ["M", "F"] * (m // 2) + ["M"] * (m % 2)
        labels[vid] = [int(v) for v in rng.integers(0, 6, m)]
        # releases differ: lists of 1-d arrays, or one 2-d array per conversation
        text[vid] = [rng.standard_normal(DT).astype(np.float32) for _ in range(m)]
        audio[vid] = rng.standard_normal((m, DA))
        visual[vid] = [list(rng.standard_normal(DV)) for _ in range(m)]
        sentences[vid] = [f"utterance {i}" for i in range(m)]
    train = {v for v in n_utts if v not in test_ids}  # a set, as in some releases
    return ids, speakers, labels, text, audio, visual, sentences, train, list(test_ids)


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


def test_conversations_format(tmp_path):
    rng = np.random.default_rng(0)
    data = conversation_tuple(rng)
    data[4]["c2"][1, 3] = -np.inf  # audio -inf as in some releases
    path = dump(tmp_path / "IEMOCAP_features.pkl", data)
    with pytest.warns(UserWarning, match=r"replaced non-finite values by 0: \{'audio': 1\}"):
        ds = load_iemocap(path)
    assert ds.names == ["text", "audio", "vision"] and ds.dims == [DT, DA, DV]
    assert ds.task == "classification" and ds.label_names == LABEL_NAMES
    assert ds.n == 9 and ds.train().n == 5 and ds.test().n == 4
    assert ds.info["nonfinite_replaced"] == {"audio": 1}
    # order: train conversations sorted (c1, c2), then test (c3), utterances in order
    np.testing.assert_array_equal(ds.labels, data[2]["c1"] + data[2]["c2"] + data[2]["c3"])
    np.testing.assert_allclose(ds.modalities["text"][3], data[3]["c2"][0])
    assert ds.modalities["audio"][4, 3] == 0
    np.testing.assert_allclose(ds.modalities["vision"][5], data[5]["c3"][0], rtol=1e-6)


def test_conversations_nonfinite_error_and_mask(tmp_path):
    data = conversation_tuple(np.random.default_rng(1))
    data[3]["c1"][2][0] = np.nan
    path = dump(tmp_path / "f.pkl", data)
    with pytest.raises(ValueError, match=r"f.pkl: modality 'text': 1 non-finite values"):
        load_iemocap(path, nonfinite="error")
    ds = load_iemocap(path, nonfinite="mask")
    assert ds.presence[:, 0].tolist() == [True, True, False] + [True] * 6
    assert ds.presence[:, 1:].all() and (ds.modalities["text"][2] == 0).all()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d[2].pop("c1"), "videoLabels: missing conversation 'c1'"),
        (lambda d: d[4].pop("c2"), "videoAudio: missing conversation 'c2'"),
        (lambda d: d[2].__setitem__("c1", [0, 6, 1]), r"labels must be 0..5 .*got \[6\]"),
        (
            lambda d: d[3].__setitem__("c1", d[3]["c1"][:2]),
            r"videoText\['c1'\]: expected 3 utterances",
        ),
        (
            lambda d: d[5].__setitem__("c3", np.zeros((4, DV + 1))),
            r"modality 'vision': feature width differs .*\[9, 10\]",
        ),
        (lambda d: d[7].add("c3"), "conversations in both trainVid and testVid"),
    ],
)
def test_conversations_malformed(tmp_path, mutate, match):
    data = conversation_tuple(np.random.default_rng(2))
    mutate(data)
    with pytest.raises(ValueError, match=match):
        load_iemocap(dump(tmp_path / "bad.pkl", data))


def split_arrays(rng, n, seq=None):
    shape = (lambda d: (n, seq, d)) if seq else (lambda d: (n, d))
    return {
        "text": rng.standard_normal(shape(DT)).astype(np.float32),
        "audio": rng.standard_normal(shape(DA)),
        "vision": rng.standard_normal(shape(DV)).astype(np.float32),
        "labels": rng.integers(0, 6, n),
    }


def test_splits_format_modality_first_with_sequences(tmp_path):
    rng = np.random.default_rng(3)
    parts = {
        "train": split_arrays(rng, 6, seq=4),
        "valid": split_arrays(rng, 2, seq=4),
        "test": split_arrays(rng, 3, seq=4),
    }
    parts["train"]["audio"][0, 1, 2] = -np.inf
    parts["test"]["audio"][1, :, 0] = np.nan
    data = {key: {s: parts[s][key] for s in parts} for key in ("text", "audio", "vision", "labels")}
    path = dump(tmp_path / "iemocap_data.pkl", data)
    with pytest.warns(UserWarning, match="'audio': 5"):
        ds = load_iemocap(path)
    assert ds.dims == [DT, DA, DV] and ds.n == 11
    assert ds.split.tolist() == ["train"] * 6 + ["valid"] * 2 + ["test"] * 3
    # 3-d features are averaged over the sequence axis, after -inf -> 0
    expected = parts["train"]["audio"][0].copy()
    expected[1, 2] = 0
    np.testing.assert_allclose(ds.modalities["audio"][0], expected.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(
        ds.test().modalities["text"], parts["test"]["text"].mean(axis=1), rtol=1e-5
    )
    assert ds.label_names is None and ds.info["format"] == "iemocap-splits"
    with pytest.raises(ValueError, match=r"audio\['train'\]: 1 non-finite"):
        load_iemocap(path, nonfinite="error")


def test_splits_format_split_first_one_hot_and_aliases(tmp_path):
    rng = np.random.default_rng(4)
    data = {}
    for split, n in (("train", 5), ("dev", 2), ("test", 3)):
        a = split_arrays(rng, n)
        data[split] = {
            "language": a["text"],
            "acoustic": a["audio"],
            "visual": a["vision"],
            "labels": np.eye(6)[a["labels"]],
        }
    ds = load_iemocap(dump(tmp_path / "s.pkl", data), format="splits")
    assert ds.split.tolist() == ["train"] * 5 + ["valid"] * 2 + ["test"] * 3
    np.testing.assert_array_equal(ds.valid().labels, data["dev"]["labels"].argmax(axis=1))


def test_splits_format_without_split(tmp_path):
    a = split_arrays(np.random.default_rng(5), 4)
    a["labels"] = a["labels"].reshape(4, 1).astype(float)
    ds = load_iemocap(dump(tmp_path / "plain.pkl", a))
    assert ds.split is None and ds.n == 4 and ds.labels.dtype == np.int64


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("vision"), r"missing key 'vision'"),
        (lambda d: d.__setitem__("audio", d["audio"][:3]), r"audio: expected 4 rows \(as labels\)"),
        (lambda d: d.__setitem__("labels", np.zeros((4, 4, 2))), "expected class ids"),
        (lambda d: d.__setitem__("labels", np.ones((4, 3))), "must be one-hot rows"),
        (lambda d: d.__setitem__("text", np.zeros(4)), r"text: expected a numeric \[n, d\]"),
        (lambda d: d.__setitem__("labels", {"train": d["labels"]}), "has splits"),
    ],
)
def test_splits_malformed(tmp_path, mutate, match):
    data = split_arrays(np.random.default_rng(6), 4)
    mutate(data)
    with pytest.raises(ValueError, match=match):
        load_iemocap(dump(tmp_path / "bad.pkl", data))


def test_unrecognised_format(tmp_path):
    with pytest.raises(ValueError, match="unrecognised IEMOCAP file"):
        load_iemocap(dump(tmp_path / "x.pkl", [1, 2, 3]))
    with pytest.raises(ValueError, match="format: expected one of"):
        load_iemocap(tmp_path / "x.pkl", format="csv")
    assert detect_format({"train": {}}) == "splits"


# ---- the restricted unpickler ----------------------------------------------------------


class Reduce:
    """Pickles as a call of ``fn(*args)``: what a malicious pickle does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_refuses_code_execution_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payloads = {
        r"(os|posix)\.system": Reduce(os.system, f"touch {marker}"),
        r"builtins\.eval": Reduce(eval, f"open({str(marker)!r}, 'w')"),
        r"subprocess\.Popen": Reduce(subprocess.Popen, ["touch", str(marker)]),
        r"builtins\.getattr": Reduce(getattr, 1, "real"),
    }
    for name, payload in payloads.items():
        # nested inside ordinary data, and inside an object-dtype array
        for obj in ({"text": [np.zeros(2), payload]}, np.array([1, payload], dtype=object)):
            path = tmp_path / "evil.pkl"
            path.write_bytes(pickle.dumps(obj, protocol=protocol))
            with pytest.raises(
                RefusedGlobalError, match=rf"refusing to load {name} from .*evil.pkl"
            ):
                safe_load(path)
            with pytest.raises(ValueError, match="only containers, numbers, strings and numpy"):
                load_iemocap(path)  # RefusedGlobalError is also a ValueError
    assert not marker.exists()


def test_roundtrips_plain_data():
    from collections import OrderedDict, defaultdict

    obj = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f": np.asfortranarray(np.ones((2, 2))),
        "s": {"x", "y"},
        "fs": frozenset([1]),
        "o": OrderedDict(b=1),
        "c": 1 + 2j,
        "d": defaultdict(list, {"k": [1]}),
        "b": b"\x00\xff",
        "n": np.float64(2.5),
        "i": np.int32(-3),
        "r": range(3),
        "t": (None, True, 1.5, "str"),
        "str_arr": np.array(["ab", "c"]),
        "obj_arr": np.array([1, "x"], dtype=object),
    }
    for protocol in (2, 4, 5):
        back = safe_loads(pickle.dumps(obj, protocol=protocol))
        assert back.keys() == obj.keys()
        for key, value in obj.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(back[key], value)
                assert back[key].dtype == value.dtype
            else:
                assert back[key] == value and type(back[key]) is type(value)


def _binstring(raw: bytes) -> bytes:
    return (
        b"U" + bytes([len(raw)]) + raw
        if len(raw) < 256
        else b"T" + struct.pack("<i", len(raw)) + raw
    )


def py2_pickle_of_array(arr: np.ndarray) -> bytes:
    """Protocol-2 bytes as Python 2 + numpy 1.x wrote them (raw data as a py2 str)."""
    assert arr.ndim == 1 and arr.dtype == np.float32 and len(arr) < 256
    return (
        b"\x80\x02}U\x05audio"
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + _binstring(b"b")
        + b"\x87R(K\x01K"
        + bytes([len(arr)])
        + b"\x85cnumpy\ndtype\n"
        + _binstring(b"f4")
        + b"K\x00K\x01\x87R(K\x03"
        + _binstring(b"<")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + _binstring(arr.tobytes())
        + b"tbs."
    )


def test_python2_pickle_with_latin1():
    arr = np.array([1.0, -np.inf, 3.5, np.nan], dtype=np.float32)
    back = safe_loads(py2_pickle_of_array(arr))
    np.testing.assert_array_equal(back["audio"], arr)
    assert back["audio"].dtype == np.float32
    # the default latin1 is what makes this work: ASCII cannot decode the raw bytes
    with pytest.raises(ValueError, match="truncated or corrupt pickle"):
        safe_loads(py2_pickle_of_array(arr), encoding="ascii")


def test_truncated_and_garbage_pickles(tmp_path):
    data = pickle.dumps(conversation_tuple(np.random.default_rng(7)), protocol=2)
    for name, content in [
        ("cut.pkl", data[: len(data) // 2]),
        ("one.pkl", data[:1]),
        ("empty.pkl", b""),
        ("junk.pkl", b"\x80\x02\xfe\xfe\xfe"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}: truncated or corrupt pickle"):
            load_iemocap(path)
    with pytest.raises(FileNotFoundError):
        load_iemocap(tmp_path / "missing.pkl")


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    import os
    import signal

    def hang(*_):
        raise TimeoutError("the loader blocked")

    os.mkfifo(tmp_path / "IEMOCAP_features.pkl")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match=r"IEMOCAP_features.pkl: a FIFO, not a regular"):
            load_iemocap(tmp_path / "IEMOCAP_features.pkl")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_arrays_the_file_cannot_hold_are_refused_whatever_the_budget(monkeypatch):
    monkeypatch.setenv("MMKERNELS_MEMORY_BUDGET", "off")
    raw = b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x02K\x04\x86\x85R."  # (2**25, 4) float64
    with pytest.raises(ValueError, match="an array of 1073741824 bytes that the 28 bytes"):
        safe_loads(raw)
    back = safe_loads(pickle.dumps(np.ones((300, 4))))  # numpy's own pickles: shape (0,) first
    assert back.shape == (300, 4)


def test_keys_that_can_share_a_hash_are_bounded_per_dict():
    import sys
    from collections import OrderedDict

    p = sys.hash_info.modulus  # k * p all hash to 0
    for bad in ({k * p: 0 for k in range(1, 5000)}, {(k, -k): 0 for k in range(5000)},
                set(k * p for k in range(1, 5000)), frozenset((k, k) for k in range(5000))):
        for protocol in (2, 4):
            with pytest.raises(ValueError, match="keys whose hash could be chosen"):
                safe_loads(pickle.dumps(bad, protocol=protocol))
    fine = [{f"k{i}": i for i in range(20000)}, {i: i for i in range(20000)},
            {i + 0.5: i for i in range(20000)}, {(i, "x"): i for i in range(20000)},
            set(range(20000)), {k * p: 0 for k in range(1, 4000)},
            OrderedDict((f"c{i}", [np.ones(2)] * 3) for i in range(5000))]
    for obj in fine:
        for protocol in (2, 4):
            assert list(safe_loads(pickle.dumps(obj, protocol=protocol))) == list(obj)
