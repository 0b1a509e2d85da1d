"""The memory budget: how many bytes one op, refit or file load may ask for at once.

A request above the budget raises :class:`MemoryBudgetError` (a ``ValueError``) that states
the bytes needed and the budget, before anything is allocated, instead of letting the
operating system kill the process. The budget is ``MMKERNELS_MEMORY_BUDGET`` (bytes, or with a
K/M/G/T suffix, powers of 1024) when set, else half of the memory available now: the
smaller of the kernel's MemAvailable and what the cgroup limit still allows.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MemoryBudgetError", "available_memory", "memory_budget", "check_memory",
           "format_bytes", "ENV_VAR"]

ENV_VAR = "MMKERNELS_MEMORY_BUDGET"
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class MemoryBudgetError(ValueError):
    """A request for more memory than :func:`memory_budget` allows (nothing was allocated)."""


def format_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Bytes the cgroup (v2) limit still allows, or None when there is no limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes this process could still get from the machine and its cgroup, or None."""
    known = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(known) if known else None


def memory_budget() -> int | None:
    """The budget in bytes (see the module docstring); None when it cannot be determined
    (no ``MMKERNELS_MEMORY_BUDGET`` and no way to read the available memory)."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if raw:
        num, suffix = raw[:-1] if raw[-1:].isalpha() else raw, raw[-1:].upper()
        suffix = suffix if suffix.isalpha() else ""
        try:
            value = int(float(num) * _SUFFIX[suffix])
        except (KeyError, ValueError):
            raise ValueError(f"{ENV_VAR}={raw!r}: expected bytes, e.g. 8000000000 or 8G") \
                from None
        if value <= 0:
            raise ValueError(f"{ENV_VAR}={raw!r}: must be > 0")
        return value
    avail = available_memory()
    return None if avail is None else avail // 2


def check_memory(what: str, nbytes: int) -> None:
    """Raise :class:`MemoryBudgetError` if ``what`` needs more than the budget."""
    budget = memory_budget()
    if budget is not None and nbytes > budget:
        raise MemoryBudgetError(
            f"{what} needs {format_bytes(nbytes)} ({nbytes} bytes) but the memory budget is "
            f"{format_bytes(budget)} ({ENV_VAR}, else half the available memory); use smaller "
            f"inputs or chunks, or raise {ENV_VAR} if the machine has the memory")
