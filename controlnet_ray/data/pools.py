"""The one policy for process pools in data preparation (rendering, pose fitting, alignment).

* ``spawn``, never ``fork``: the caller may already hold threads (Ray, torch, OpenCV) that
  make a forked child unsafe.
* The worker count comes from :func:`pool_workers`: what was asked for (``None``: every CPU
  this process may run on), never more than those CPUs or the jobs there are, at least one.
  Results never depend on it; each caller decides whether a job is big enough for a pool.
* A worker that dies (killed for memory, a ``__main__`` that ``spawn`` cannot re-import)
  breaks the pool; :func:`process_pool` turns that into a :class:`PoolError`, one line that
  names the job, and on any error cancels the jobs not yet started instead of waiting on them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool


class PoolError(RuntimeError):
    """A worker process of a data-preparation pool died; the message names the job."""


def usable_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup-aware where the OS says so)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pool_workers(requested: int | None, jobs: int | None = None) -> int:
    """Worker processes for a pool: ``requested`` (``None``: every usable CPU), at most the
    usable CPUs and ``jobs`` (when given), at least 1."""
    cpus = usable_cpus()
    workers = cpus if requested is None else min(int(requested), cpus)
    if jobs is not None:
        workers = min(workers, jobs)
    return max(1, workers)


@contextlib.contextmanager
def process_pool(
    job: str, workers: int, initializer: Callable[[], None] | None = None
) -> Iterator[ProcessPoolExecutor]:
    """A spawned ``ProcessPoolExecutor`` of ``workers`` processes for ``job`` (a few words
    naming the work, used in the error); see the module docstring for the policy."""
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer)
    try:
        yield pool
    except BrokenProcessPool as exc:
        pool.shutdown(wait=True, cancel_futures=True)
        raise PoolError(
            f"{job}: a worker process died ({exc}); the usual causes are a worker killed for "
            "memory or a __main__ that a spawned process cannot re-import (a script read from "
            "stdin); with 1 worker the job runs in this process and shows its own error"
        ) from exc
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
