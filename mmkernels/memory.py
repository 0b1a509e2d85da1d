"""The memory budget: how many bytes one op, refit or file load may ask for at once.

One budget for the whole package, computed in C++ (``csrc/include/mmkernels/memory_budget.h``)
so the fused ops, libtorch users and the Python layers agree: ``MMKERNELS_MEMORY_BUDGET`` when
set (bytes, or with a K/M/G/T suffix, powers of 1024; ``off`` for none), else 80 % of the
memory available now on the CPU (the smaller of MemAvailable and the cgroup's room), 90 % of
the free memory on a GPU.

A request above it raises :class:`MemoryBudgetError` before anything is allocated, stating the
bytes needed and the budget, instead of letting the operating system kill the process. The
error is both a ``torch.OutOfMemoryError`` (what the fused ops raise, so one ``except``
catches every budget refusal) and a ``ValueError`` (what the file loaders promise).
"""

from __future__ import annotations

import torch

from mmkernels._native import native

__all__ = ["MemoryBudgetError", "memory_budget", "check_memory", "format_bytes", "ENV_VAR"]

ENV_VAR = "MMKERNELS_MEMORY_BUDGET"


class MemoryBudgetError(torch.OutOfMemoryError, ValueError):
    """A request for more memory than :func:`memory_budget` allows (nothing was allocated)."""


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def memory_budget(device: str | torch.device = "cpu") -> tuple[float, str]:
    """(bytes, where the figure comes from) of the budget on ``device``; bytes is ``inf``
    when there is no limit (``MMKERNELS_MEMORY_BUDGET=off``, or nothing to read it from).

    Raises:
        ValueError: ``MMKERNELS_MEMORY_BUDGET`` is not a byte count.
    """
    bytes_, source = native().memory_budget(str(torch.device(device)))
    return float(bytes_), str(source)


def check_memory(what: str, nbytes: int, device: str | torch.device = "cpu", *,
                 hint: str = "use smaller inputs or chunks",
                 budget: tuple[float, str] | None = None) -> None:
    """Raise :class:`MemoryBudgetError` if ``what`` needs more than the budget of ``device``
    (or ``budget``, a :func:`memory_budget` result taken earlier: a running total must be
    compared with the budget from before it was built); ``hint`` says how to need less."""
    limit, source = memory_budget(device) if budget is None else budget
    if nbytes > limit:  # never true for an infinite (no) limit
        raise MemoryBudgetError(
            f"{what} needs {format_bytes(nbytes)} ({nbytes} bytes), more than the memory budget "
            f"of {format_bytes(limit)} ({limit:.0f} bytes: {source}); {hint}, or set {ENV_VAR} "
            "(e.g. 64G, or off) if the machine has the memory")
