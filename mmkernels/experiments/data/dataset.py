"""The in-memory multi-modal dataset and its ``.npz`` file format.

A :class:`MultiModalDataset` holds K feature matrices (one per modality, in a fixed order),
one label vector, and optionally a per-sample presence mask and a train/valid/test split.
It validates everything on construction, so downstream code (the fused ops, the sweeps) can
trust shapes and dtypes and never meets a NaN it did not ask for.

File format (version 1): a plain ``.npz`` archive read with ``allow_pickle=False``:

    modality/<name>   [n, d_k] float    one entry per modality
    labels            [n] int (classification) or [n] / [n, t] float (regression)
    presence          [n, K] bool       optional
    split             [n] str           optional; values "train", "valid", "test"
    meta              0-d str           JSON: format, version, modality order, task,
                                        label_names, info
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmkernels.memory import MemoryBudgetError, check_memory

from .files import NotARegularFileError, open_regular_file

if TYPE_CHECKING:  # torch is imported lazily: loading data should not pay for it
    import torch

FORMAT_NAME = "mmkernels.MultiModalDataset"
FORMAT_VERSION = 1
TASKS = ("classification", "regression")
SPLITS = ("train", "valid", "test")
NONFINITE_POLICIES = ("error", "zero", "mask")
# Class ids go up to this (exclusive): a model's output layer has one row per class, and a
# stray id of 10^9 would ask for terabytes.
MAX_CLASSES = 1 << 16


def _shape(a: np.ndarray) -> str:
    return "[" + ", ".join(str(s) for s in a.shape) + "]"


def _check_float(a: np.ndarray, what: str) -> None:
    """Float arrays must be float16/32/64 in the machine's byte order: torch has no
    longdouble and refuses a foreign byte order, deep inside a sweep."""
    if a.dtype.kind != "f":
        return
    if a.dtype.itemsize > 8:
        raise ValueError(f"{what}: expected float16, float32 or float64, got {a.dtype} "
                         f"(extended precision); convert with a.astype(np.float64)")
    if not a.dtype.isnative:
        raise ValueError(f"{what}: expected the machine's byte order, got {a.dtype.str} "
                         f"({'big' if a.dtype.byteorder == '>' else 'little'}-endian); convert "
                         "with a.astype(a.dtype.newbyteorder('='))")


@dataclass(eq=False)  # a field-wise == would compare arrays ambiguously
class MultiModalDataset:
    """K modalities of n samples each, with labels and an optional presence mask and split.

    Args:
        modalities: ordered mapping name -> [n, d_k] array (float; integer input is cast to
            float32). The mapping order is the modality order everywhere (``names``,
            ``to_torch``, presence columns, subset masks).
        labels: [n] non-negative int class ids (classification) or [n] / [n, t] float
            targets (regression).
        task: "classification" or "regression".
        presence: optional [n, K] bool; False means sample i lacks modality k.
        split: optional [n] array of "train" / "valid" / "test".
        label_names: optional class names (classification), index = class id.
        info: free-form JSON-serialisable provenance (source file, counts of replaced
            values, ...); saved with the data.
        nonfinite: what to do with NaN/Inf features (construction only, not stored):
            "error" (default) raises; "zero" replaces them by 0; "mask" marks each affected
            (sample, modality) as absent in ``presence`` and zeroes that sample's whole block,
            which is what "absent" means to a concatenation model.

    Raises:
        ValueError: naming the offending argument/key with expected vs actual.
    """

    modalities: dict[str, np.ndarray]
    labels: np.ndarray
    task: str = "classification"
    presence: np.ndarray | None = None
    split: np.ndarray | None = None
    label_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    nonfinite: InitVar[str] = "error"

    def __post_init__(self, nonfinite: str) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite: expected one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.modalities = self._check_modalities(self.modalities)
        n = next(iter(self.modalities.values())).shape[0]
        self.labels = self._check_labels(self.labels, n)
        self.presence = self._check_presence(self.presence, n)
        self.split = self._check_split(self.split, n)
        if self.label_names is not None:
            self.label_names = [str(s) for s in self.label_names]
            if self.task == "classification" and self.labels.size:
                if int(self.labels.max()) >= len(self.label_names):
                    raise ValueError(
                        f"label_names: has {len(self.label_names)} names but labels go up "
                        f"to {int(self.labels.max())}"
                    )
        self._apply_nonfinite(nonfinite)

    # ---- validation -------------------------------------------------------------------

    @staticmethod
    def _check_modalities(mods: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(mods, Mapping) or len(mods) == 0:
            raise ValueError(
                "modalities: expected a non-empty mapping name -> [n, d] array, "
                f"got {type(mods).__name__} {mods!r:.100}"
            )
        out: dict[str, np.ndarray] = {}
        n_first: tuple[str, int] | None = None
        for name, arr in mods.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(
                    f"modalities: names must be non-empty strings without '/', got {name!r}"
                )
            a = np.asarray(arr)
            if a.dtype.kind not in "fiu":
                raise ValueError(
                    f"modality {name!r}: expected a numeric (float or int) array, "
                    f"got dtype {a.dtype}"
                )
            if a.ndim != 2:
                raise ValueError(
                    f"modality {name!r}: expected a 2-d array [n, d], got shape {_shape(a)}"
                )
            if a.shape[1] == 0:
                raise ValueError(f"modality {name!r}: expected at least one feature column, "
                                 f"got shape {_shape(a)}")
            _check_float(a, f"modality {name!r}")
            if a.dtype.kind in "iu":
                a = a.astype(np.float32)
            if n_first is None:
                n_first = (name, a.shape[0])
            elif a.shape[0] != n_first[1]:
                raise ValueError(
                    f"modality {name!r}: expected {n_first[1]} rows (as modality "
                    f"{n_first[0]!r}), got {a.shape[0]}"
                )
            out[name] = a
        return out

    def _check_labels(self, labels: Any, n: int) -> np.ndarray:
        y = np.asarray(labels)
        if y.dtype.kind not in "fiub":
            raise ValueError(f"labels: expected a numeric array, got dtype {y.dtype}")
        if y.shape[:1] != (n,):
            raise ValueError(
                f"labels: expected {n} rows (as the modalities), got shape {_shape(y)}"
            )
        if self.task == "classification":
            if y.ndim != 1 or y.dtype.kind not in "iub":
                raise ValueError(
                    f"labels: classification expects a 1-d integer array [{n}], "
                    f"got shape {_shape(y)} dtype {y.dtype}"
                )
            if y.size and y.min() < 0:
                raise ValueError(f"labels: class ids must be >= 0, got minimum {int(y.min())}")
            if y.size and int(y.max()) >= MAX_CLASSES:  # before int64, where 2^63 wraps
                raise ValueError(f"labels: class ids must be < {MAX_CLASSES} (one output per "
                                 f"class), got maximum {int(y.max())}")
            y = y.astype(np.int64)
        else:
            if y.ndim not in (1, 2):
                raise ValueError(
                    f"labels: regression expects shape [{n}] or [{n}, t], got {_shape(y)}"
                )
            _check_float(y, "labels")
            if y.dtype.kind != "f":
                y = y.astype(np.float32)
            bad = int(np.count_nonzero(~np.isfinite(y)))
            if bad:
                raise ValueError(f"labels: {bad} non-finite (NaN/Inf) regression targets")
        return y

    def _check_presence(self, presence: Any, n: int) -> np.ndarray | None:
        if presence is None:
            return None
        p = np.asarray(presence)
        k = len(self.modalities)
        if p.shape != (n, k):
            raise ValueError(f"presence: expected shape [{n}, {k}], got {_shape(p)}")
        if p.dtype != np.bool_:
            raise ValueError(f"presence: expected dtype bool, got {p.dtype}")
        return p

    @staticmethod
    def _check_split(split: Any, n: int) -> np.ndarray | None:
        if split is None:
            return None
        s = np.asarray(split)
        if s.dtype.kind not in "US":
            raise ValueError(f"split: expected strings from {SPLITS}, got dtype {s.dtype}")
        s = s.astype(str)
        if s.shape != (n,):
            raise ValueError(f"split: expected shape [{n}], got {_shape(s)}")
        unknown = sorted(set(np.unique(s).tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"split: expected values from {SPLITS}, got {unknown}")
        return s

    def _apply_nonfinite(self, policy: str) -> None:
        for k, (name, a) in enumerate(self.modalities.items()):
            bad = ~np.isfinite(a)
            count = int(np.count_nonzero(bad))
            if count == 0:
                continue
            if policy == "error":
                raise ValueError(
                    f"modality {name!r}: {count} non-finite values (NaN/Inf) in "
                    f"{int(np.count_nonzero(bad.any(axis=1)))} rows; pass "
                    "nonfinite='zero' or 'mask' to accept them"
                )
            a = a.copy()  # never mutate the caller's array
            if policy == "zero":
                a[bad] = 0
            else:  # "mask": the whole block of an affected sample becomes absent
                rows = bad.any(axis=1)
                a[rows] = 0
                if self.presence is None:
                    self.presence = np.ones((a.shape[0], len(self.modalities)), dtype=bool)
                else:
                    self.presence = self.presence.copy()
                self.presence[rows, k] = False
            self.modalities[name] = a

    # ---- views ------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Modality names in order."""
        return list(self.modalities)

    @property
    def dims(self) -> list[int]:
        """Feature width d_k of each modality, in order."""
        return [a.shape[1] for a in self.modalities.values()]

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.labels.shape[0])

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    @property
    def n_classes(self) -> int:
        """Number of classes (classification): len(label_names) if given, else max id + 1."""
        if self.task != "classification":
            raise ValueError("n_classes: only defined for task 'classification'")
        if self.label_names is not None:
            return len(self.label_names)
        return int(self.labels.max()) + 1 if self.labels.size else 0

    def __len__(self) -> int:
        return self.n

    def subset(self, idx: Any) -> MultiModalDataset:
        """Rows ``idx`` (int indices, bool mask or slice) as a new dataset (arrays copied)."""
        if isinstance(idx, slice):
            idx = np.arange(self.n)[idx]
        idx = np.asarray(idx)
        if idx.size == 0:
            idx = idx.astype(np.int64)  # np.asarray([]) is float64, not a valid index
        if idx.dtype == np.bool_ and idx.shape != (self.n,):
            raise ValueError(f"idx: bool mask must have shape [{self.n}], got {_shape(idx)}")
        return MultiModalDataset(
            modalities={k: v[idx] for k, v in self.modalities.items()},
            labels=self.labels[idx],
            task=self.task,
            presence=None if self.presence is None else self.presence[idx],
            split=None if self.split is None else self.split[idx],
            label_names=self.label_names,
            info=dict(self.info),
        )

    def where_split(self, name: str) -> MultiModalDataset:
        """The rows whose split is ``name`` ("train", "valid" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"split name: expected one of {SPLITS}, got {name!r}")
        if self.split is None:
            raise ValueError("split: this dataset has no split; use subset(idx) instead")
        return self.subset(self.split == name)

    def train(self) -> MultiModalDataset:
        return self.where_split("train")

    def valid(self) -> MultiModalDataset:
        return self.where_split("valid")

    def test(self) -> MultiModalDataset:
        return self.where_split("test")

    # ---- torch ------------------------------------------------------------------------

    def to_torch(
        self, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> list[torch.Tensor]:
        """Features as a list of K tensors [n, d_k] in modality order (default float32).

        Raises:
            ValueError: a value that is finite as stored is not in ``dtype`` (1e39 in float64
                is inf in float32); the message names the modality.
        """
        import torch

        dtype = torch.float32 if dtype is None else dtype
        out = []
        for name, a in self.modalities.items():
            t = torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)
            _check_fits(t, f"modality {name!r}", a.dtype)
            out.append(t)
        return out

    def torch_labels(self, device: str | torch.device | None = None) -> torch.Tensor:
        """Labels as int64 (classification) or float32 (regression)."""
        import torch

        dtype = torch.int64 if self.task == "classification" else torch.float32
        y = torch.as_tensor(self.labels).to(device=device, dtype=dtype)
        if self.task == "regression":
            _check_fits(y, "labels", self.labels.dtype)
        return y

    def torch_presence(self, device: str | torch.device | None = None) -> torch.Tensor | None:
        """Presence as a bool [n, K] tensor (the fused ops' sample_mask), or None."""
        import torch

        if self.presence is None:
            return None
        return torch.as_tensor(self.presence).to(device=device)

    # ---- files ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, compress: bool = False) -> None:
        """Write the dataset to ``path`` exactly (no ``.npz`` suffix is appended).

        The file is written to a temporary name and renamed, so a crash never leaves a
        half-written file under ``path``.
        """
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "modalities": self.names,
            "task": self.task,
            "label_names": self.label_names,
            "info": self.info,
        }
        arrays: dict[str, np.ndarray] = {f"modality/{k}": v for k, v in self.modalities.items()}
        arrays["labels"] = self.labels
        if self.presence is not None:
            arrays["presence"] = self.presence
        if self.split is not None:
            arrays["split"] = self.split
        arrays["meta"] = np.array(json.dumps(meta))
        path = os.fspath(path)
        # A sibling temporary name (same filesystem, so the rename is atomic); plain open()
        # rather than mkstemp so the file gets the usual umask permissions, not 0600.
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                (np.savez_compressed if compress else np.savez)(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, nonfinite: str = "error",
             max_modalities: int | None = None) -> MultiModalDataset:
        """Read a file written by :meth:`save` (``allow_pickle=False``, always).

        max_modalities: refuse a file with more modalities (TooManyModalitiesError), counted
        from the archive's listing before any member is decompressed.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not a regular file (a FIFO would block forever), is
                truncated/corrupt, is not this format, has an unknown version, misses a key,
                or fails validation; the message names the file.
        """
        path = os.fspath(path)
        try:
            with open_regular_file(path, "dataset file") as f:
                z = np.load(f, allow_pickle=False)
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive (a single .npy array?)")
                with z:
                    _check_modality_count(z, path, max_modalities)
                    _check_members(z, path)
                    raw = {key: z[key] for key in z.files}
        except (FileNotFoundError, NotARegularFileError, MemoryBudgetError,
                TooManyModalitiesError):
            raise
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError, MemoryError,
                NotImplementedError, RuntimeError) as e:
            # numpy raises ValueError for pickled/object entries and for files that are
            # not archives at all; zipfile NotImplementedError for an unknown zip version
            # and RuntimeError for an "encrypted" member. Corrupt bytes produce all of these,
            # and all mean "this is not a readable dataset".
            raise ValueError(
                f"{path}: cannot read dataset file (truncated, corrupt or not a "
                f"{FORMAT_NAME} .npz): {type(e).__name__}: {e}"
            ) from e
        try:
            return cls._from_arrays(raw, nonfinite)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    @classmethod
    def _from_arrays(cls, raw: dict[str, np.ndarray], nonfinite: str) -> MultiModalDataset:
        if "meta" not in raw:
            raise ValueError("missing key 'meta' (not a mmkernels dataset file?)")
        try:
            meta = json.loads(str(raw["meta"]))
        except json.JSONDecodeError as e:
            raise ValueError(f"key 'meta': invalid JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ValueError(f"key 'meta': expected format {FORMAT_NAME!r}, got {meta!r:.200}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"key 'meta': unsupported format version {meta.get('version')!r} "
                f"(this version of mmkernels reads version {FORMAT_VERSION})"
            )
        for key in ("modalities", "task"):
            if key not in meta:
                raise ValueError(f"key 'meta': missing field {key!r}")
        names = list(meta["modalities"])
        stored = sorted(k[len("modality/") :] for k in raw if k.startswith("modality/"))
        if sorted(names) != stored:
            raise ValueError(f"modality keys: meta lists {names}, the file holds {stored}")
        for key in ("labels",):
            if key not in raw:
                raise ValueError(f"missing key {key!r}")
        return cls(
            modalities={k: raw[f"modality/{k}"] for k in names},
            labels=raw["labels"],
            task=meta["task"],
            presence=raw.get("presence"),
            split=raw.get("split"),
            label_names=meta.get("label_names"),
            info=meta.get("info") or {},
            nonfinite=nonfinite,
        )

    # ---- misc -------------------------------------------------------------------------

    def __repr__(self) -> str:
        mods = ", ".join(f"{k}={v.shape[1]}" for k, v in self.modalities.items())
        parts = [f"n={self.n}", f"modalities=({mods})", f"task={self.task!r}"]
        if self.split is not None:
            counts = {s: int(np.count_nonzero(self.split == s)) for s in SPLITS}
            parts.append("split=" + "/".join(f"{s}:{c}" for s, c in counts.items() if c))
        if self.presence is not None:
            parts.append(f"absent={int(np.count_nonzero(~self.presence))}")
        return f"MultiModalDataset({', '.join(parts)})"


def _check_fits(t: torch.Tensor, what: str, stored: np.dtype) -> None:
    """``t`` (converted from a finite array of dtype ``stored``) must still be finite."""
    import torch

    bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
    if bad:
        raise ValueError(f"{what}: {bad} value{'s are' if bad > 1 else ' is'} finite in "
                         f"{stored} but overflow{'' if bad > 1 else 's'} "
                         f"{str(t.dtype).removeprefix('torch.')} (|x| > "
                         f"{torch.finfo(t.dtype).max:.3g}); rescale the features")


class TooManyModalitiesError(ValueError):
    """A dataset file holds more modalities than its reader takes."""


def _check_modality_count(z: np.lib.npyio.NpzFile, path: str, limit: int | None) -> None:
    # z.files is the zip's central directory: counting costs nothing however large the file
    count = sum(1 for name in z.files if name.startswith("modality/"))
    if limit is not None and count > limit:
        raise TooManyModalitiesError(f"{path}: {count} modalities; at most {limit} are taken "
                                     "here")


def _check_members(z: np.lib.npyio.NpzFile, path: str) -> None:
    """Before any array is read: each member's header must describe no more bytes than the
    member holds (numpy allocates the header's shape first), and all members together must
    fit the memory budget (the sizes are the uncompressed ones, so a small compressed file
    that expands to gigabytes is caught here)."""
    total = 0
    for info in z.zip.infolist():
        total += info.file_size
        if not info.filename.endswith(".npy"):  # numpy returns other members as raw bytes
            continue
        with z.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            # 2.0's reader also parses 3.0 headers (the same layout; utf-8 only matters for
            # non-ASCII field names, which numeric datasets do not have).
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size:
            raise ValueError(f"member {info.filename!r}: its header declares shape "
                             f"{list(shape)} {dtype} ({nbytes} bytes) but the member holds "
                             f"{info.file_size} bytes (truncated or hostile file)")
    check_memory(f"{path}: loading {len(z.files)} arrays", total)


def concat_splits(parts: Sequence[tuple[str, MultiModalDataset]]) -> MultiModalDataset:
    """Stack datasets with the same modalities into one, tagging each part's split."""
    if not parts:
        raise ValueError("parts: expected at least one (split, dataset) pair")
    first = parts[0][1]
    for name, ds in parts:
        if ds.names != first.names or ds.dims != first.dims or ds.task != first.task:
            raise ValueError(
                f"parts: split {name!r} has modalities {ds.names} dims {ds.dims} "
                f"task {ds.task!r}, expected {first.names} dims {first.dims} "
                f"task {first.task!r}"
            )
    presence = None
    if any(ds.presence is not None for _, ds in parts):
        presence = np.concatenate(
            [
                ds.presence if ds.presence is not None else np.ones((ds.n, ds.n_modalities), bool)
                for _, ds in parts
            ]
        )
    return MultiModalDataset(
        modalities={k: np.concatenate([ds.modalities[k] for _, ds in parts]) for k in first.names},
        labels=np.concatenate([ds.labels for _, ds in parts]),
        task=first.task,
        presence=presence,
        split=np.concatenate([np.full(ds.n, name) for name, ds in parts]),
        label_names=first.label_names,
        info=dict(first.info),
    )
