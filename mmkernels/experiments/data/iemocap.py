"""Loaders for the two common IEMOCAP feature files (docs/paper.md, Experiment 1).

Both come as pickles from third parties, so they are read with the restricted unpickler
(:mod:`mmkernels.experiments.data.safe_pickle`): a file that references anything beyond containers,
numbers, strings and numpy arrays is refused without running it.

Formats:
    "conversations": the 6-class conversation-level 9-tuple
        (videoIDs, videoSpeakers, videoLabels, videoText, videoAudio, videoVisual,
        videoSentence, trainVid, testVid). The video* entries are dicts keyed by
        conversation id holding one entry per utterance. Utterances are flattened in the
        order: train conversations (sorted by id), then test conversations (sorted by id),
        utterances in file order; the split comes from trainVid / testVid and
        conversations in neither list are skipped.
        Labels: hap 0, sad 1, neu 2, ang 3, exc 4, fru 5.
    "splits": a dict of text / audio / vision / labels, either modality-first
        (``d["text"]["train"]``) or split-first (``d["train"]["text"]``), or with plain
        arrays and no split. Splits are "train", "valid"/"dev", "test". Sequence features
        [n, seq, d] are averaged over the sequence axis (padding included: the file gives
        no lengths). Labels may be class ids [n] / [n, 1] or one-hot rows [n, C].

Dimensions are always read from the arrays. Non-finite values (some releases hold -inf
in audio) follow ``nonfinite``: "zero" (default) replaces them by 0 before any averaging
and records how many per modality in ``info["nonfinite_replaced"]`` (with a warning);
"error" raises; "mask" marks the affected samples' modality absent (see
:class:`~mmkernels.experiments.data.dataset.MultiModalDataset`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmkernels.memory import check_memory, memory_budget

from .dataset import MultiModalDataset
from .safe_pickle import safe_load

MODALITIES = ("text", "audio", "vision")
LABEL_NAMES = ["hap", "sad", "neu", "ang", "exc", "fru"]
FORMATS = ("auto", "conversations", "splits")
NONFINITE = ("zero", "error", "mask")

# Accepted spellings of each key in "splits" files.
_ALIASES = {
    "text": ("text", "language"),
    "audio": ("audio", "acoustic"),
    "vision": ("vision", "visual", "video"),
    "labels": ("labels", "label"),
}
_SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "dev", "val"), "test": ("test",)}


def load_iemocap(
    path: str | os.PathLike[str], *, format: str = "auto", nonfinite: str = "zero"
) -> MultiModalDataset:
    """Load an IEMOCAP feature pickle as a classification dataset (text, audio, vision).

    Args:
        path: the pickle file.
        format: "auto" (detect), "conversations" or "splits" (see the module docstring).
        nonfinite: "zero" (default), "error" or "mask".

    Raises:
        ValueError: unreadable, refused or malformed file; the message names the file and
            the offending key.
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    source = os.fspath(path)
    data = safe_load(source)
    if format == "auto":
        format = detect_format(data, source)
    if format == "conversations":
        return iemocap_from_conversations(data, nonfinite=nonfinite, source=source)
    return iemocap_from_splits(data, nonfinite=nonfinite, source=source)


def detect_format(data: Any, source: str = "<data>") -> str:
    """ "conversations" for a 9-tuple of dicts, "splits" for a dict with modality keys."""
    if isinstance(data, (tuple, list)) and len(data) == 9 and isinstance(data[2], Mapping):
        return "conversations"
    if isinstance(data, Mapping):
        keys = {str(k).lower() for k in data}
        split_keys = {a for aliases in _SPLIT_ALIASES.values() for a in aliases}
        mod_keys = {a for aliases in _ALIASES.values() for a in aliases}
        if keys & mod_keys or keys & split_keys:
            return "splits"
    raise ValueError(
        f"{source}: unrecognised IEMOCAP file: expected a 9-tuple (videoIDs, ..., trainVid, "
        f"testVid) or a dict with text/audio/vision/labels keys, got {_describe(data)}"
    )


def iemocap_from_conversations(
    data: Sequence[Any], *, nonfinite: str = "zero", source: str = "<data>"
) -> MultiModalDataset:
    """Flatten the conversation-level 9-tuple into utterances (see the module docstring)."""
    _check_policy(nonfinite)
    if not isinstance(data, (tuple, list)) or len(data) != 9:
        raise ValueError(f"{source}: expected a 9-tuple, got {_describe(data)}")
    _ids, _speakers, labels, text, audio, visual, _sentences, train_vid, test_vid = data
    # modality -> (the file's name for it, its per-conversation table)
    per_mod = {
        "text": ("videoText", text),
        "audio": ("videoAudio", audio),
        "vision": ("videoVisual", visual),
    }
    for key, value in (("videoLabels", labels), *per_mod.values()):
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{source}: {key}: expected a dict keyed by conversation id, got {_describe(value)}"
            )
    train_ids, test_ids = _sorted_ids(train_vid), _sorted_ids(test_vid)
    both = set(train_ids) & set(test_ids)
    if both:
        raise ValueError(
            f"{source}: conversations in both trainVid and testVid: {sorted(both)[:5]}"
        )

    for name, ids in (("trainVid", train_ids), ("testVid", test_ids)):
        if len(set(ids)) != len(ids):  # a repeated id would copy its features again
            raise ValueError(f"{source}: {name} lists a conversation more than once")

    budget = _Budget(source)
    feats: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    ys: list[np.ndarray] = []
    split: list[str] = []
    for split_name, ids in (("train", train_ids), ("test", test_ids)):
        for vid in ids:
            if vid not in labels:
                raise ValueError(f"{source}: videoLabels: missing conversation {vid!r}")
            y = np.asarray(labels[vid])
            if y.size == 0:
                y = y.astype(np.int64)  # np.asarray([]) is float64
            if y.ndim != 1 or y.dtype.kind not in "iu":
                raise ValueError(
                    f"{source}: videoLabels[{vid!r}]: expected a list of int labels, "
                    f"got shape {list(y.shape)} dtype {y.dtype}"
                )
            bad = (y < 0) | (y >= len(LABEL_NAMES))
            if bad.any():
                raise ValueError(
                    f"{source}: videoLabels[{vid!r}]: labels must be 0..{len(LABEL_NAMES) - 1} "
                    f"({', '.join(LABEL_NAMES)}), got {y[bad][:5].tolist()}"
                )
            for m, (key, table) in per_mod.items():
                if vid not in table:
                    raise ValueError(f"{source}: {key}: missing conversation {vid!r}")
                x = _as_float_2d(table[vid], f"{source}: {key}[{vid!r}]", budget)
                if x.shape[0] != y.shape[0]:
                    raise ValueError(
                        f"{source}: {key}[{vid!r}]: expected {y.shape[0]} utterances "
                        f"(as videoLabels), got {x.shape[0]}"
                    )
                feats[m].append(x)
            ys.append(y.astype(np.int64))
            split.extend([split_name] * y.shape[0])
    if not ys:
        raise ValueError(f"{source}: trainVid and testVid list no conversations")
    arrays = {m: _concat(feats[m], f"{source}: modality {m!r}") for m in MODALITIES}
    return _build(
        arrays,
        np.concatenate(ys),
        np.asarray(split),
        LABEL_NAMES,
        nonfinite,
        source,
        "conversations",
    )


def iemocap_from_splits(
    data: Mapping[str, Any], *, nonfinite: str = "zero", source: str = "<data>"
) -> MultiModalDataset:
    """Build the dataset from a text/audio/vision/labels dict (see the module docstring)."""
    _check_policy(nonfinite)
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a dict, got {_describe(data)}")
    split_first = _find(data, _SPLIT_ALIASES["train"]) is not None
    if split_first:
        # d["train"]["text"] -> regroup as d["text"]["train"]
        regrouped: dict[str, dict[str, Any]] = {}
        for split, aliases in _SPLIT_ALIASES.items():
            part = _find(data, aliases)
            if part is None:
                continue
            if not isinstance(part, Mapping):
                raise ValueError(f"{source}: key {split!r}: expected a dict, got {_describe(part)}")
            for key, key_aliases in _ALIASES.items():
                value = _find(part, key_aliases)
                if value is None:
                    raise ValueError(f"{source}: key {split!r}: missing {key!r} (or {key_aliases})")
                regrouped.setdefault(key, {})[split] = value
        data = regrouped

    columns: dict[str, dict[str | None, Any]] = {}
    for key, aliases in _ALIASES.items():
        value = _find(data, aliases)
        if value is None:
            raise ValueError(f"{source}: missing key {key!r} (accepted spellings: {aliases})")
        if isinstance(value, Mapping):
            columns[key] = {}
            for split, split_aliases in _SPLIT_ALIASES.items():
                part = _find(value, split_aliases)
                if part is not None:
                    columns[key][split] = part
            if not columns[key]:
                raise ValueError(
                    f"{source}: key {key!r}: expected train/valid/test entries, got keys "
                    f"{sorted(map(str, value))}"
                )
        else:
            columns[key] = {None: value}

    splits = list(columns["labels"])
    for key in MODALITIES:
        if list(columns[key]) != splits:
            raise ValueError(
                f"{source}: key {key!r}: has splits {list(columns[key])}, labels have {splits}"
            )

    budget = _Budget(source)
    replaced: dict[str, int] = {}
    feats: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    ys, split_col = [], []
    for split in splits:
        where = f"[{split!r}]" if split is not None else ""
        y = _labels(columns["labels"][split], f"{source}: labels{where}")
        for m in MODALITIES:
            name = f"{source}: {m}{where}"
            budget.take(columns[m][split], name)
            x = np.asarray(columns[m][split])
            if x.dtype.kind not in "fiu" or x.ndim not in (2, 3):
                raise ValueError(
                    f"{name}: expected a numeric [n, d] or [n, seq, d] array, got shape "
                    f"{list(x.shape)} dtype {x.dtype}"
                )
            with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, policed below
                x = x.astype(np.float32)
            if nonfinite != "mask":  # "mask" is decided per row after averaging
                count = _nonfinite(x, nonfinite, name)
                replaced[m] = replaced.get(m, 0) + count
            if x.ndim == 3:
                x = x.mean(axis=1)
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{name}: expected {y.shape[0]} rows (as labels), got {x.shape[0]}"
                )
            feats[m].append(x)
        ys.append(y)
        if split is not None:
            split_col.extend([split] * y.shape[0])
    arrays = {m: _concat(feats[m], f"{source}: modality {m!r}") for m in MODALITIES}
    return _build(
        arrays,
        np.concatenate(ys),
        None if splits == [None] else np.asarray(split_col, dtype=str),
        None,
        nonfinite,
        source,
        "splits",
        replaced,
    )


# ---- helpers ---------------------------------------------------------------------------


def _check_policy(nonfinite: str) -> None:
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite: expected one of {NONFINITE}, got {nonfinite!r}")


def _describe(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of length {len(x)}"
    if isinstance(x, np.ndarray):
        return f"array of shape {list(x.shape)}"
    return type(x).__name__


def _find(d: Mapping[Any, Any], aliases: Sequence[str]) -> Any:
    for key in d:
        if str(key).lower() in aliases:
            return d[key]
    return None


def _sorted_ids(ids: Any) -> list[Any]:
    # trainVid/testVid are lists or sets depending on the release; sort for a fixed order.
    return sorted(ids, key=str)


class _Budget:
    """The float32 bytes a loader is about to build, checked against the memory budget (taken
    once, when the load starts: the figure shrinks as the load itself uses memory) before
    each conversion. A pickle's memo lets a few bytes reference one array a million times,
    which np.asarray would copy a million times."""

    def __init__(self, source: str) -> None:
        self.source, self.total, self.budget = source, 0, memory_budget()

    def take(self, value: Any, name: str) -> None:
        self.total += _float32_bytes(value, name)
        check_memory(f"{self.source}: the features up to {name}", self.total,
                     budget=self.budget)


def _float32_bytes(value: Any, name: str) -> int:
    """Bytes of np.asarray(value, float32), found without building it: numpy refuses ragged
    nesting, so the first element of each level stands for the rest. Only arrays, lists,
    tuples and numbers are features; anything else (a range, a string) is refused here,
    where its size cannot be judged."""
    count = 1
    while isinstance(value, (list, tuple)):
        count *= len(value)
        if not value:
            return 0
        value = value[0]
    if isinstance(value, np.ndarray):
        return 4 * count * value.size
    if isinstance(value, (int, float, np.number, bool, np.bool_)):
        return 4 * count
    raise ValueError(f"{name}: expected numeric features (arrays, lists or numbers), got "
                     f"{type(value).__name__}")


def _as_float_2d(value: Any, name: str, budget: _Budget) -> np.ndarray:
    budget.take(value, name)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, policed later
            x = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name}: utterance features of unequal length or non-numeric ({e})"
        ) from e
    if x.ndim != 2:
        raise ValueError(f"{name}: expected [utterances, d] features, got shape {list(x.shape)}")
    return x


def _concat(parts: list[np.ndarray], name: str) -> np.ndarray:
    dims = sorted({p.shape[1] for p in parts})
    if len(dims) > 1:
        raise ValueError(f"{name}: feature width differs between conversations/splits: {dims}")
    return np.concatenate(parts)


def _labels(value: Any, name: str) -> np.ndarray:
    y = np.asarray(value)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        # One-hot rows -> class ids; anything else (multi-label, per-emotion binary
        # [n, 4, 2] as in some 4-emotion releases) is not a 6-class label.
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise ValueError(
                f"{name}: [n, C] labels must be one-hot rows, got shape {list(y.shape)}"
            )
        y = y.argmax(axis=1)
    if y.ndim != 1:
        raise ValueError(
            f"{name}: expected class ids [n] or one-hot [n, C], got shape {list(y.shape)}"
        )
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise ValueError(f"{name}: float labels must be whole numbers")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"{name}: expected numeric labels, got dtype {y.dtype}")
    return y.astype(np.int64)


def _nonfinite(x: np.ndarray, policy: str, name: str) -> int:
    """Apply "zero" / "error" to x in place; return the number of replaced entries."""
    bad = ~np.isfinite(x)
    count = int(np.count_nonzero(bad))
    if count and policy == "error":
        raise ValueError(
            f"{name}: {count} non-finite values (NaN/Inf); pass nonfinite='zero' or 'mask'"
        )
    x[bad] = 0
    return count


def _build(
    arrays: dict[str, np.ndarray],
    labels: np.ndarray,
    split: np.ndarray | None,
    label_names: list[str] | None,
    nonfinite: str,
    source: str,
    fmt: str,
    replaced: dict[str, int] | None = None,
) -> MultiModalDataset:
    if replaced is None:  # conversations: apply the policy on the flattened arrays
        replaced = {}
        if nonfinite != "mask":
            for m, x in arrays.items():
                replaced[m] = _nonfinite(x, nonfinite, f"{source}: modality {m!r}")
    replaced = {m: c for m, c in replaced.items() if c}
    if replaced:
        warnings.warn(f"{source}: replaced non-finite values by 0: {replaced}", stacklevel=3)
    info: dict[str, Any] = {"source": os.path.basename(source), "format": f"iemocap-{fmt}"}
    if replaced:
        info["nonfinite_replaced"] = replaced
    try:
        return MultiModalDataset(
            arrays,
            labels,
            task="classification",
            split=split,
            label_names=label_names,
            info=info,
            nonfinite="mask" if nonfinite == "mask" else "error",
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
