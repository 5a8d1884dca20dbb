"""The one process-pool policy of data preparation (controlnet_ray.data.pools), on a real pool;
its bounded ordered map (shared with Ray tasks) on plain callables."""

from __future__ import annotations

import math
import os

import pytest

from controlnet_ray.data.pools import PoolError, pool_workers, process_pool, usable_cpus


def test_worker_count_is_capped_by_cpus_and_jobs_and_at_least_one() -> None:
    cpus = usable_cpus()
    assert pool_workers(None) == cpus
    assert pool_workers(cpus + 5) == cpus
    assert pool_workers(None, jobs=1) == 1
    assert pool_workers(0) == 1
    assert pool_workers(2, jobs=0) == 1


def test_real_pool_returns_results_in_order_and_a_dead_worker_is_one_line_naming_the_job() -> None:
    with process_pool("test job: square roots", 2) as pool:
        assert list(pool.map(math.sqrt, [1.0, 4.0, 9.0])) == [1.0, 2.0, 3.0]
    with pytest.raises(PoolError) as info, process_pool("test job: dying worker", 2) as pool:
        pool.submit(os._exit, 3).result(timeout=120)  # the worker process exits mid-job
    message = str(info.value)
    assert message.startswith("test job: dying worker: a worker process died")
    assert "\n" not in message


def test_windowed_keeps_job_order_and_at_most_the_window_in_flight() -> None:
    """The one bounded, ordered map the process pools and Ray tasks share."""
    from controlnet_ray.data.pools import windowed

    in_flight: list[int] = []
    most = 0

    def submit(job: int) -> int:
        nonlocal most
        in_flight.append(job)
        most = max(most, len(in_flight))
        return job

    def collect(handle: int) -> int:
        in_flight.remove(handle)
        return handle * 10

    assert list(windowed(submit, collect, range(7), 3)) == [j * 10 for j in range(7)]
    assert most == 3 and in_flight == []
