"""The results store of a sweep: an append-only JSON Lines file, one record per finished cell.

``DIR/records.jsonl`` holds one line per cell::

    {"key": ..., "dataset": ..., "seed": ..., "fraction": ..., "data": <fingerprint>,
     "config": {...}, "records": {"subsets": [...], ...}, "versions": {...},
     "runtime_s": ..., "finished_utc": ..., "sha256": <of every other field>}

Why this shape:

* Append-only with one ``write`` per record on an ``O_APPEND`` descriptor, then ``fsync``: a
  finished cell is never rewritten, so a kill can only tear the record being written, and
  only at the end of the file.
* A record is valid only if its line ends in a newline, parses, and its checksum matches, so a
  torn record (a SIGKILL or a power cut mid-write) is detected, never half-read. The writer
  moves torn bytes to ``DIR/records.torn`` (kept, not deleted) and truncates the file back to
  its last valid record; the torn record's cell is then simply not finished and runs again.
* Readers take no lock and skip an incomplete last line, so the file can be read (for
  example by :func:`read_records`, or ``tail -f``) while a sweep appends to it.
* One writer at a time: :meth:`ResultStore.writer` takes an exclusive ``flock`` on
  ``DIR/records.lock`` and fails with :class:`StoreBusyError` if another sweep holds it.
  :meth:`ResultStore.locked` holds the same lock around more than the appends (the command
  line holds it from before it writes anything into DIR until its report is written); the
  lock is re-entrant for the same :class:`ResultStore`. Workers never write; the sweep's
  driver appends what they return.
* Lines keep the order in which a record's fields were made (the checksum is over the
  fields sorted, so it does not depend on that order): a resumed sweep's tables have the
  columns of an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .io import to_jsonable

__all__ = ["ResultStore", "StoreWriter", "StoreBusyError", "read_records", "RECORDS_FILE"]

RECORDS_FILE = "records.jsonl"
_TORN_FILE = "records.torn"
_LOCK_FILE = "records.lock"


class StoreBusyError(RuntimeError):
    """Another sweep holds the store's lock (nothing was written)."""


def _warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside this module and contextlib."""
    import contextlib

    inside = {os.path.abspath(__file__), os.path.abspath(contextlib.__file__)}
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename) in inside:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _encode(record: dict[str, Any]) -> bytes:
    body = to_jsonable({k: v for k, v in record.items() if k != "sha256"})
    body["sha256"] = _checksum(body)
    return (json.dumps(body, allow_nan=False) + "\n").encode()


def _decode(line: bytes) -> dict[str, Any] | None:
    """The record on ``line`` (with its newline), or None if it is not a valid record."""
    if not line.endswith(b"\n"):
        return None
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
        return None
    body = {k: v for k, v in rec.items() if k != "sha256"}
    return rec if rec.get("sha256") == _checksum(body) else None


def _scan(data: bytes) -> tuple[list[dict[str, Any]], int, list[int]]:
    """Valid records, the length of the newline-terminated prefix, and the line numbers of
    damaged lines inside it. A record is one line (JSON escapes newlines in strings), so bytes
    after the last newline are a torn record and a terminated but invalid line is damage."""
    end = data.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        rec = _decode(line + b"\n")
        if rec is None:
            bad.append(lineno)
        else:
            records.append(rec)
    return records, end, bad


def _fsync_dir(folder: Path) -> None:
    """Make a created, renamed or removed name in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every valid record in ``folder/records.jsonl`` in the order written, without a lock
    (safe while a sweep is appending); a torn or damaged line is skipped. Duplicate keys
    keep their first record."""
    path = Path(folder) / RECORDS_FILE
    if not path.exists():
        return []
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block this read forever
        raise ValueError(f"{path}: not a regular file, so not a results store")
    records, _, _ = _scan(path.read_bytes())
    seen: set[str] = set()
    out = []
    for rec in records:
        if rec["key"] not in seen:
            seen.add(rec["key"])
            out.append(rec)
    return out


class StoreWriter:
    """Appends records to an open store; made by :meth:`ResultStore.writer`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def append(self, record: dict[str, Any]) -> None:
        """Write one record (it must have a "key") as one line, then fsync."""
        if not isinstance(record.get("key"), str):
            raise ValueError("a store record needs a string 'key'")
        data = _encode(record)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)


class ResultStore:
    """The append-only store in ``folder`` (created on first write)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / RECORDS_FILE
        self._held = 0  # how deep this object holds the lock (it is re-entrant)
        self._writing = False  # a writer of this object is open

    def records(self) -> dict[str, dict[str, Any]]:
        """Finished cells by key (see :func:`read_records`)."""
        return {r["key"]: r for r in read_records(self.folder)}

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's exclusive lock (creating the folder if needed), or raise
        :class:`StoreBusyError` at once if another sweep holds it. Re-entrant: the
        :meth:`writer` and :meth:`start_over` of this object reuse a lock it holds."""
        if self._held:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
            return
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            _fsync_dir(self.folder.parent)
        lock = os.open(self.folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusyError(f"results store {self.folder} is in use by another sweep "
                                     f"(lock {self.folder / _LOCK_FILE}); wait for it or use "
                                     "another output folder") from None
            self._held = 1
            try:
                yield
            finally:
                self._held = 0
        finally:
            os.close(lock)  # closing releases the flock

    @contextmanager
    def writer(self) -> Iterator[StoreWriter]:
        """Lock the store, repair a torn tail, and yield a :class:`StoreWriter`."""
        with self.locked():
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError(f"{self.path}: not a regular file, so not a results store")
                if created:  # the new name must survive a power cut too
                    _fsync_dir(self.folder)
                self._repair(fd)
                self._writing = True
                yield StoreWriter(fd)
            finally:
                self._writing = False
                os.close(fd)

    def start_over(self) -> Path | None:
        """Under the lock, rename the records to ``records.<UTC time>[.N].jsonl`` (never over
        an existing file) so the next writer starts empty; the new name, or None if there
        were no records."""
        if self._writing:  # its appends would follow the renamed file
            raise StoreBusyError(f"results store {self.folder}: its records are being written "
                                 "(a writer is open); start over after it closes")
        with self.locked():
            if not self.path.exists():
                return None
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            for n in range(1000):
                kept = self.folder / f"records.{stamp}{f'.{n}' if n else ''}.jsonl"
                try:
                    os.link(self.path, kept)  # fails if the name exists: nothing is replaced
                except FileExistsError:
                    continue
                os.unlink(self.path)
                _fsync_dir(self.folder)
                return kept
            raise RuntimeError(f"{self.folder}: no free name to keep the old records under")

    def _repair(self, fd: int) -> None:
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        _, good_end, bad = _scan(data)
        if bad:
            _warn(f"{self.path}: skipping damaged record(s) on line(s) {bad}; "
                  "their cells run again")
        if good_end == len(data):
            return
        torn = data[good_end:]
        with open(self.folder / _TORN_FILE, "ab") as f:
            f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
                    f"{len(torn)} bytes cut from {RECORDS_FILE} at byte {good_end}\n".encode())
            f.write(torn + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.ftruncate(fd, good_end)
        os.fsync(fd)
        _warn(f"{self.path}: the last record was torn ({len(torn)} bytes, kept in "
              f"{_TORN_FILE}); its cell runs again")
