"""Running a worker function on two real Gloo ranks (spawned processes) and collecting results."""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    worker: Callable[[int, int, int, Any], None], world: int = 2, timeout: float = 90
) -> dict[int, tuple]:
    """Start ``worker(rank, world, port, queue)`` on each rank; each puts ``(rank, *result)``
    on the queue. Returns ``{rank: result}``; stragglers are killed, never waited on forever."""
    ctx = multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, *rest = queue.get(timeout=timeout)
            results[rank] = tuple(rest)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results
