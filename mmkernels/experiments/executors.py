"""Where sweep cells run: in this process, on Ray, or on any concurrent.futures-style executor.

:func:`mmkernels.experiments.sweep.run_sweep` takes any object with ``submit(fn, *args)``
returning a future with ``result()`` (``concurrent.futures`` pools, Dask's
``client.get_executor()``, submitit's ``AutoExecutor``). :class:`RayExecutor` is that interface
over Ray tasks, with a CPU / GPU request per cell; Ray is the optional extra
``pip install mmkernels[ray]``.

Determinism: a cell's result depends on its seed and on the number of torch threads it runs
with (a GEMM's reduction order follows the thread split). Ray workers therefore run each cell
with exactly ``cpus_per_cell`` torch threads; the in-process run uses the caller's setting
(the CLI's ``--threads``, default 1), so ``--threads N`` and ``--cpus-per-cell N`` give
bitwise-identical records.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["RayExecutor", "as_completed_any", "run_with_threads"]


def run_with_threads(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with ``threads`` torch threads and the CPU allocation cache
    (mmkernels.cpu_memory), in a worker process, which owns both."""
    import torch

    from mmkernels.cpu_memory import enable_allocation_cache

    torch.set_num_threads(threads)
    enable_allocation_cache()
    return fn(*args)


class RayExecutor:
    """Ray tasks behind ``submit``: each call becomes one task asking for ``cpus_per_cell``
    CPUs and ``gpus_per_cell`` GPUs, and returns a ``concurrent.futures.Future``.

    Args:
        address: a running cluster ("auto", "ray://host:10001", ...); None starts a local Ray
            with ``num_cpus`` CPUs (None: all) that :meth:`shutdown` stops again.
        cpus_per_cell, gpus_per_cell: resources requested per cell (``cpus_per_cell`` is also
            the cell's torch thread count).
        num_cpus: CPUs of a local Ray (ignored with ``address``).

    Large arguments (anything but numbers, strings and None) are put in Ray's object store once
    per executor, so a sweep ships its dataset once rather than once per cell.
    """

    def __init__(self, address: str | None = None, *, cpus_per_cell: int = 1,
                 gpus_per_cell: float = 0, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ImportError("the Ray executor needs Ray: pip install 'mmkernels[ray]' "
                              "(or pip install ray)") from exc
        if cpus_per_cell < 1:
            raise ValueError(f"cpus_per_cell must be >= 1, got {cpus_per_cell}")
        if gpus_per_cell < 0:
            raise ValueError(f"gpus_per_cell must be >= 0, got {gpus_per_cell}")
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                kw["num_cpus"] = num_cpus
            ray.init(address=address, **kw)
        self._task = ray.remote(run_with_threads).options(
            num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=0)
        self.cpus_per_cell = cpus_per_cell
        self._puts: dict[int, tuple[Any, Any]] = {}

    def _ref(self, arg: Any) -> Any:
        if arg is None or isinstance(arg, (bool, int, float, str)):
            return arg
        hit = self._puts.get(id(arg))
        if hit is None:  # keep the object alive so its id is not reused
            hit = self._puts[id(arg)] = (arg, self._ray.put(arg))
        return hit[1]

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        """Run ``fn(*args)`` as a Ray task; a ``concurrent.futures.Future`` of its result."""
        refs = [self._ref(a) for a in args]
        return self._task.remote(self.cpus_per_cell, fn, *refs).future()

    def shutdown(self, wait: bool = True) -> None:
        """Forget the stored arguments, and stop Ray if this executor started it."""
        self._puts.clear()
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def as_completed_any(futures: Sequence[Any], poll_s: float = 0.05) -> Iterator[int]:
    """Indices of ``futures`` as they finish: ``concurrent.futures.as_completed`` for standard
    futures, polling ``done()`` for others (submitit jobs), else in submission order."""
    if all(isinstance(f, cf.Future) for f in futures):
        index = {id(f): i for i, f in enumerate(futures)}
        for f in cf.as_completed(futures):
            yield index[id(f)]
        return
    if not all(callable(getattr(f, "done", None)) for f in futures):
        yield from range(len(futures))
        return
    pending = set(range(len(futures)))
    while pending:
        ready = [i for i in sorted(pending) if futures[i].done()]
        for i in ready:
            pending.discard(i)
            yield i
        if not ready:
            time.sleep(poll_s)
