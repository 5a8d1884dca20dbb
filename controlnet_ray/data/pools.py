"""The one policy for process pools in data preparation (rendering, pose fitting, alignment),
and the one decision of when that work runs as Ray tasks on a cluster instead.

* ``spawn``, never ``fork``: the caller may already hold threads (Ray, torch, OpenCV) that
  make a forked child unsafe.
* The worker count comes from :func:`pool_workers`: what was asked for (``None``: every CPU
  this process may run on), never more than those CPUs or the jobs there are, at least one.
  Results never depend on it; each caller decides whether a job is big enough for a pool.
* A worker that dies (killed for memory, a ``__main__`` that ``spawn`` cannot re-import)
  breaks the pool; :func:`process_pool` turns that into a :class:`PoolError`, one line that
  names the job, and on any error cancels the jobs not yet started instead of waiting on them.
* Connected to a multi-node Ray cluster (:func:`ray_cluster_cpus` > 0), the expensive steps
  of a preparation (decode + align, pose fitting, the judges' one-time training) run as Ray
  tasks on the cluster's nodes (:class:`RayTasks`, :func:`ray_call`), not on the driver's
  machine, which on the shipped cluster configs is a head started with ``num-cpus: 0``.
  Locally (no Ray, or a one-machine Ray) nothing changes: the pools above, or inline.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any


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


def windowed(
    submit: Callable[[Any], Any],
    collect: Callable[[Any], Any],
    jobs: Iterable[Any],
    window: int,
) -> Iterator[Any]:
    """``collect(submit(job))`` for each job, in job order, with at most ``window`` jobs
    submitted and not yet collected, so memory stays bounded however many jobs there are (a
    process pool's futures and Ray's object refs alike)."""
    pending: deque = deque()
    remaining = iter(jobs)
    for job in itertools.islice(remaining, window):
        pending.append(submit(job))
    while pending:
        result = collect(pending.popleft())
        for job in itertools.islice(remaining, 1):
            pending.append(submit(job))
        yield result


def ray_cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to, when it has several nodes
    (0 otherwise: no Ray, or one machine, where a process pool does the same job without
    Ray's per-task cost). A head started with 0 CPUs (as the shipped manifests start it)
    counts as a node: its driver then runs the work on the other nodes, not on the head.
    Never starts Ray. The one test of "on the cluster or here" for preparation work."""
    if "ray" not in sys.modules:
        return 0
    import ray

    if not ray.is_initialized():
        return 0
    nodes = _alive_nodes()
    if len(nodes) < 2:
        return 0
    return int(sum(n.get("Resources", {}).get("CPU", 0) for n in nodes))


def ray_task_cpus(requested: int) -> int:
    """CPUs for one Ray task that wants ``requested``: at least 1, at most the largest live
    node's CPUs (a task bigger than every node would wait forever)."""
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in _alive_nodes()), default=1)
    return max(1, min(int(requested), int(largest)))


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _on_node(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """``fn(*args)`` in a Ray task, with the ID of the node it ran on (so the driver can say
    where the work ran)."""
    import ray

    return ray.get_runtime_context().get_node_id(), fn(*args)


def _task_name(fn: Callable[..., Any]) -> str:
    """The job's name, for Ray's task list and the prefix of the lines it prints."""
    return getattr(fn, "__name__", "job")


class RayTasks:
    """A process pool's ``map`` over a Ray cluster: each job a Ray task of one CPU on whichever
    node has one (``SPREAD``), results in job order, at most ``window`` jobs in flight (memory
    stays bounded); the IDs of the nodes that ran them gather in ``nodes``. Every node must
    see the files a job reads at the same paths (a shared mount, as ``--cache_dir`` already
    must be)."""

    def __init__(self, window: int) -> None:
        self.window = max(1, int(window))
        self.nodes: set[str] = set()

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> Iterator[Any]:
        import ray

        remote = ray.remote(_on_node).options(
            num_cpus=1, scheduling_strategy="SPREAD", name=_task_name(fn)
        )
        for node, result in windowed(
            lambda job: remote.remote(fn, job), ray.get, jobs, self.window
        ):
            self.nodes.add(node)
            yield result

    def where(self) -> str:
        """The nodes that ran the jobs so far, for the line that says where the work ran."""
        return ", ".join(sorted(self.nodes))


def ray_call(fn: Callable[..., Any], *args: Any, num_cpus: int) -> tuple[str, Any]:
    """``fn(*args)`` as one Ray task holding ``num_cpus`` CPUs (so never on a 0-CPU head):
    (the node it ran on, its result). An error in ``fn`` is raised here."""
    import ray

    remote = ray.remote(_on_node).options(num_cpus=num_cpus, name=_task_name(fn))
    return ray.get(remote.remote(fn, *args))
