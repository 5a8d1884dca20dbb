"""Shared fixtures: one real local Ray cluster per test module that asks for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 3 logical CPUs (2 training workers + 1 for Ray Data), like Ray's tests."""
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
