"""Atomic result files: every writer goes to a temporary file in the target folder, flushes
and fsyncs it, then renames it over the target (os.replace), so a killed run leaves either
the previous complete file or the new complete file, never a half-written one.

A kill between creating the temporary and renaming it leaves ``.<name>.<8 chars>.tmp``
behind; :func:`remove_stale_temporaries` clears them (the command line calls it under the
results store's lock, when no other run can be writing). Files get the permissions of an
ordinary ``open`` (0666 less the umask: 0644 by default), not a private temporary's 0600."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_bytes_atomic", "write_text_atomic", "write_json", "write_csv", "to_jsonable",
           "remove_stale_temporaries"]

# The temporaries of write_bytes_atomic (and of tempfile.mkstemp, which earlier versions used).
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def _create_temporary(path: Path) -> tuple[int, str]:
    """An exclusively created ``.<name>.<8 hex>.tmp`` beside ``path``, mode 0666 less the
    umask (tempfile.mkstemp would make it 0600, and the rename would keep that)."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries a killed :func:`write_bytes_atomic` left in ``folder``; the
    removed paths. Call it only when no other writer can be using the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if _TEMPORARY.fullmatch(p.name) and p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text, written atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy/torch scalars to numbers, tuples to lists, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """JSON (indented, NaN written as null), atomically."""
    return write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def write_csv(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]],
    fieldnames: Iterable[str] | None = None,
) -> Path:
    """Rows of dicts as CSV (header from fieldnames, else the union of keys in order),
    None written as an empty cell; atomically."""
    keys: list[str] = list(fieldnames) if fieldnames is not None else []
    if fieldnames is None:
        for row in rows:
            keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    return write_text_atomic(path, buf.getvalue())
