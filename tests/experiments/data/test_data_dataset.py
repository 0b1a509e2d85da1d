"""MultiModalDataset: validation, views, torch conversion and the .npz file format."""

import json
import os
import tempfile
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmkernels.experiments.data.dataset import MultiModalDataset, concat_splits


def make(n=6, dims=(3, 2), **kwargs):
    rng = np.random.default_rng(0)
    mods = {f"m{k}": rng.standard_normal((n, d)).astype(np.float32) for k, d in enumerate(dims)}
    kwargs.setdefault("labels", np.arange(n) % 3)
    return MultiModalDataset(mods, **kwargs)


def assert_same(a, b):
    assert a.names == b.names and a.task == b.task
    for k in a.names:
        np.testing.assert_array_equal(a.modalities[k], b.modalities[k])
        assert a.modalities[k].dtype == b.modalities[k].dtype
    np.testing.assert_array_equal(a.labels, b.labels)
    for attr in ("presence", "split"):
        x, y = getattr(a, attr), getattr(b, attr)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert a.label_names == b.label_names and a.info == b.info


def test_basic_views():
    split = np.array(["train", "train", "test", "valid", "test", "train"])
    ds = make(split=split, label_names=["a", "b", "c"])
    assert ds.names == ["m0", "m1"] and ds.dims == [3, 2] and ds.n == len(ds) == 6
    assert ds.n_classes == 3
    assert ds.train().n == 3 and ds.test().n == 2 and ds.valid().n == 1
    np.testing.assert_array_equal(ds.test().labels, [2, 1])
    sub = ds.subset([5, 0])
    np.testing.assert_array_equal(sub.modalities["m1"], ds.modalities["m1"][[5, 0]])
    assert ds.subset(slice(1, 3)).n == 2 and ds.subset([]).n == 0
    assert "train:3" in repr(ds)


def test_to_torch():
    presence = np.ones((6, 2), dtype=bool)
    presence[1, 0] = False
    ds = make(presence=presence)
    xs = ds.to_torch()
    assert [tuple(x.shape) for x in xs] == [(6, 3), (6, 2)]
    assert all(x.dtype == torch.float32 for x in xs)
    assert torch.equal(xs[1], torch.from_numpy(ds.modalities["m1"]))
    assert ds.to_torch(dtype=torch.float64)[0].dtype == torch.float64
    assert ds.torch_labels().dtype == torch.int64
    assert ds.torch_presence().dtype == torch.bool
    reg = make(labels=np.linspace(0, 1, 6), task="regression")
    assert reg.torch_labels().dtype == torch.float32 and reg.torch_presence() is None


def test_split_required_for_train_view():
    with pytest.raises(ValueError, match="this dataset has no split"):
        make().train()


def test_nonfinite_policies():
    mods = {"a": np.array([[1.0, np.nan], [2.0, 3.0], [np.inf, -np.inf]]), "b": np.ones((3, 1))}
    with pytest.raises(
        ValueError, match=r"modality 'a': 3 non-finite values \(NaN/Inf\) in 2 rows"
    ):
        MultiModalDataset(mods, np.zeros(3, int))
    zero = MultiModalDataset(mods, np.zeros(3, int), nonfinite="zero")
    np.testing.assert_array_equal(zero.modalities["a"], [[1, 0], [2, 3], [0, 0]])
    assert zero.presence is None
    mask = MultiModalDataset(mods, np.zeros(3, int), nonfinite="mask")
    np.testing.assert_array_equal(mask.modalities["a"], [[0, 0], [2, 3], [0, 0]])
    np.testing.assert_array_equal(mask.presence, [[False, True], [True, True], [False, True]])
    assert np.isnan(mods["a"][0, 1])  # the caller's array is untouched


ERRORS = [
    (dict(modalities={}), "modalities: expected a non-empty mapping"),
    (dict(modalities={"a/b": np.zeros((2, 1))}), "names must be non-empty strings without '/'"),
    (
        dict(modalities={"a": np.zeros(2)}),
        r"modality 'a': expected a 2-d array \[n, d\], got shape \[2\]",
    ),
    (dict(modalities={"a": np.array([["x"], ["y"]])}), "modality 'a': expected a numeric"),
    (dict(modalities={"a": np.zeros((2, 1), dtype=object)}), "dtype object"),
    (
        dict(modalities={"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}),
        r"modality 'b': expected 2 rows \(as modality 'a'\), got 3",
    ),
    (
        dict(labels=np.zeros(3, int)),
        r"labels: expected 2 rows \(as the modalities\), got shape \[3\]",
    ),
    (dict(labels=np.zeros(2)), r"labels: classification expects a 1-d integer array \[2\]"),
    (dict(labels=np.zeros((2, 2), int)), "classification expects a 1-d integer array"),
    (dict(labels=np.array([0, -1])), "class ids must be >= 0, got minimum -1"),
    (dict(labels=np.array(["a", "b"])), "labels: expected a numeric array"),
    (dict(labels=np.array([0.0, np.nan]), task="regression"), "1 non-finite"),
    (
        dict(labels=np.zeros((2, 2, 2)), task="regression"),
        r"regression expects shape \[2\] or \[2, t\]",
    ),
    (dict(task="ranking"), "task: expected one of"),
    (dict(presence=np.ones((2, 2), bool)), r"presence: expected shape \[2, 1\], got \[2, 2\]"),
    (dict(presence=np.ones((2, 1), int)), "presence: expected dtype bool, got int64"),
    (dict(split=np.array([0, 1])), "split: expected strings"),
    (dict(split=np.array(["train"])), r"split: expected shape \[2\], got \[1\]"),
    (dict(split=np.array(["train", "dev"])), r"split: expected values from .* got \['dev'\]"),
    (
        dict(label_names=["x"], labels=np.array([0, 1])),
        "label_names: has 1 names but labels go up to 1",
    ),
    (dict(nonfinite="ignore"), "nonfinite: expected one of"),
    # torch cannot take these; found deep inside a sweep they gave no file or key
    (dict(modalities={"a": np.zeros((2, 1), ">f4")}),
     r"modality 'a': expected the machine's byte order, got >f4 \(big-endian\)"),
    (dict(modalities={"a": np.zeros((2, 1), np.longdouble)}),
     "modality 'a': expected float16, float32 or float64, got float128"),
    (dict(modalities={"a": np.zeros((2, 0))}),
     r"modality 'a': expected at least one feature column, got shape \[2, 0\]"),
    (dict(labels=np.array([0, 10**9])), "labels: class ids must be < 65536 .* got maximum "
                                        "1000000000"),
    (dict(labels=np.array([0, 2**64 - 1], np.uint64)), "class ids must be < 65536"),
    (dict(labels=np.zeros(2, ">f8"), task="regression"),
     "labels: expected the machine's byte order, got >f8"),
]


@pytest.mark.parametrize("kwargs, match", ERRORS)
def test_validation_errors(kwargs, match):
    args = dict(modalities={"a": np.zeros((2, 1))}, labels=np.zeros(2, int))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MultiModalDataset(**args)


def test_integer_features_become_float32():
    ds = MultiModalDataset({"a": np.arange(4).reshape(2, 2)}, np.zeros(2, int))
    assert ds.modalities["a"].dtype == np.float32


@st.composite
def datasets(draw):
    n = draw(st.integers(0, 12))
    dims = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mods = {f"mod{k}": rng.standard_normal((n, d)).astype(dtype) for k, d in enumerate(dims)}
    task = draw(st.sampled_from(["classification", "regression"]))
    if task == "classification":
        labels = rng.integers(0, 4, n)
    else:
        labels = rng.standard_normal((n, 2) if draw(st.booleans()) else n)
    presence = rng.random((n, len(dims))) < 0.7 if draw(st.booleans()) else None
    split = rng.choice(["train", "valid", "test"], n) if draw(st.booleans()) else None
    return MultiModalDataset(
        mods, labels, task=task, presence=presence, split=split, info={"seed": 1, "note": "x"}
    )


@settings(max_examples=25, deadline=None)
@given(ds=datasets(), compress=st.booleans())
def test_save_load_roundtrip(ds, compress):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.bin")  # no suffix is appended
        ds.save(path, compress=compress)
        assert os.listdir(tmp) == ["data.bin"]  # the temporary file was renamed
        assert_same(ds, MultiModalDataset.load(path))


def test_file_layout(tmp_path):
    path = tmp_path / "d.npz"
    make(split=np.array(["train"] * 6), label_names=["a", "b", "c"]).save(path)
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["labels", "meta", "modality/m0", "modality/m1", "split"]
        meta = json.loads(str(z["meta"]))
    assert meta["version"] == 1 and meta["modalities"] == ["m0", "m1"]
    assert meta["task"] == "classification" and meta["label_names"] == ["a", "b", "c"]


def rewrite(path, drop=(), **replace):
    """Rewrite an .npz file with some entries dropped or replaced."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    arrays.update(replace)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def meta_with(path, **fields):
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    meta.update(fields)
    return np.array(json.dumps(meta))


def test_load_errors_name_the_file_and_key(tmp_path):
    good = tmp_path / "good.npz"
    make().save(good)

    def broken(name, **kw):
        p = tmp_path / name
        p.write_bytes(good.read_bytes())
        rewrite(p, **kw)
        return p

    cases = [
        (broken("nometa.npz", drop=("meta",)), "missing key 'meta'"),
        (broken("nolabels.npz", drop=("labels",)), "missing key 'labels'"),
        (
            broken("nomod.npz", drop=("modality/m1",)),
            r"meta lists \['m0', 'm1'\], the file holds \['m0'\]",
        ),
        (broken("v2.npz", meta=meta_with(good, version=2)), "unsupported format version 2"),
        (broken("fmt.npz", meta=meta_with(good, format="other")), "expected format"),
        (broken("json.npz", meta=np.array("{not json")), "key 'meta': invalid JSON"),
        (
            broken("nan.npz", **{"modality/m0": np.full((6, 3), np.nan)}),
            "modality 'm0': 18 non-finite",
        ),
        (broken("rows.npz", labels=np.zeros(5, int)), "labels: expected 6 rows"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            MultiModalDataset.load(path)
        assert str(path) in str(info.value)
    # the non-finite policy applies on load too
    ds = MultiModalDataset.load(tmp_path / "nan.npz", nonfinite="mask")
    assert not ds.presence[:, 0].any()


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.npz"
    make(n=200).save(good)
    data = good.read_bytes()
    for name, content in [
        ("truncated.npz", data[: len(data) // 2]),
        ("tail.npz", data[:-10]),
        ("empty.npz", b""),
        ("garbage.npz", b"\x00\x01 not a zip file at all" * 10),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match="cannot read dataset file") as info:
            MultiModalDataset.load(path)
        assert str(path) in str(info.value)

    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(ValueError, match="not an .npz archive"):
        MultiModalDataset.load(npy)

    # a pickled (object) entry is refused, never unpickled
    obj = tmp_path / "object.npz"
    with open(obj, "wb") as f:
        np.savez(f, labels=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="cannot read dataset file"):
        MultiModalDataset.load(obj)

    # corrupt member data (bad CRC) inside an otherwise valid archive
    crc = tmp_path / "crc.npz"
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("modality/m0.npy")
    raw = bytearray(data)
    raw[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    crc.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="cannot read dataset file"):
        MultiModalDataset.load(crc)

    with pytest.raises(FileNotFoundError):
        MultiModalDataset.load(tmp_path / "missing.npz")


def test_concat_splits():
    a, b = make(n=3), make(n=2, presence=np.ones((2, 2), bool))
    ds = concat_splits([("train", a), ("test", b)])
    assert ds.n == 5 and ds.split.tolist() == ["train"] * 3 + ["test"] * 2
    assert ds.presence.all()
    with pytest.raises(ValueError, match="split 'test' has modalities"):
        concat_splits([("train", a), ("test", make(n=2, dims=(3,)))])


def test_conversion_to_float32_must_stay_finite():
    big = np.ones((3, 2))
    big[1, 1] = 1e39  # finite in float64, inf in float32
    ds = MultiModalDataset({"a": np.ones((3, 1), np.float32), "b": big}, np.arange(3))
    with pytest.raises(ValueError, match=r"modality 'b': 1 value is finite in float64 but "
                                         r"overflows float32 \(\|x\| > 3.4e\+38\)"):
        ds.to_torch()
    assert ds.to_torch(dtype=torch.float64)[1][1, 1] == 1e39  # fine where it fits
    reg = MultiModalDataset({"a": np.ones((2, 1))}, np.array([1.0, -1e300]), task="regression")
    with pytest.raises(ValueError, match="labels: 1 value is finite in float64"):
        reg.torch_labels()


def _no_hang(fn, *args):
    import signal

    def hang(*_):
        raise TimeoutError("the loader blocked")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(10)
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)  # np.load would wait for a writer forever
    with pytest.raises(ValueError, match=r"data.npz: a FIFO, not a regular file"):
        _no_hang(MultiModalDataset.load, fifo)
    with pytest.raises(ValueError, match="a folder, not a regular file"):
        _no_hang(MultiModalDataset.load, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        MultiModalDataset.load(tmp_path / "missing.npz")
