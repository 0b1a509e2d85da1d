"""Opening a data file only when it is a regular file.

``open()`` on a FIFO blocks until a writer appears and a character device (``/dev/zero``)
never ends, so a loader given one would hang forever. The file is opened non-blocking, checked
with ``fstat`` (on the descriptor, so it cannot be swapped between the check and the read),
and only then read.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

__all__ = ["NotARegularFileError", "open_regular_file"]


class NotARegularFileError(ValueError):
    """The path names a FIFO, a device, a socket or a folder rather than a file."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular_file(path: str | os.PathLike[str], what: str = "file") -> BinaryIO:
    """``path`` opened for binary reading.

    Raises:
        FileNotFoundError: no such path ("no such {what}: {path}").
        NotARegularFileError: (a ValueError) a FIFO, device, socket or folder.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such {what}: {path}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(f"{path}: {_kind(mode)}, not a regular file; give the "
                                       f"path of a {what}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
