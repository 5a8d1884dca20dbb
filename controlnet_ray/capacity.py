"""What the Ray cluster must hold before a run starts, and waiting for an autoscaler to grow it.

Ray never fails a request that does not fit: a GPU run on a GPU-less cluster waits forever. So
the driver compares the run's needs with the cluster first. A fixed cluster (the local Ray a
run starts) fits now or never, and a shortfall fails at once, naming the flags. A connected
cluster may autoscale (``cluster/raycluster.yaml``: 1..4 GPU workers), which takes minutes: the
run asks the autoscaler for its exact resource shapes (``ray.autoscaler.sdk.request_resources``,
public API), fails at once when the autoscaler's reported limits can never fit them, and
otherwise waits at most ``--resource_wait_s``, printing what is still missing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from controlnet_ray.config import ConfigError, TrainConfig

POLL_S = 5.0  # between two looks at the cluster while waiting
REPORT_EVERY_S = 30.0  # a progress line at least this often while waiting
WAIT_FLAG = "--resource_wait_s"
# CPUs kept free for Ray Data beside the training workers (train) or all trials (tune): one
# number so a run and a sweep plan the same headroom.
DATA_CPUS = 1.0
#: The smallest share of a CPU a worker is planned with when CPUs are short.
MIN_CPUS_PER_WORKER = 0.25

Resources = Mapping[str, float]


@dataclass(frozen=True)
class Need:
    """Resources a run holds at once: totals to compare, shapes to ask an autoscaler for."""

    totals: dict[str, float]  # summed over the cluster, e.g. {"CPU": 3.0, "GPU": 2.0}
    bundles: tuple[dict[str, float], ...]  # one per worker / trial / Ray Data
    flags: str  # the flags that set the totals, for the messages
    remedy: str  # what the user can change when it can never fit


def missing(need: Resources, have: Resources) -> dict[str, float]:
    """The resources of ``need`` that ``have`` lacks (name -> what is needed)."""
    return {k: v for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}


def fmt(res: Resources, keys: Sequence[str] | None = None) -> str:
    """``2 GPU, 3 CPU`` (only ``keys`` when given)."""
    names = sorted(res) if keys is None else keys
    return ", ".join(f"{res.get(k, 0.0):g} {k}" for k in names) or "nothing"


def _ray_totals() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def autoscaler_ceiling() -> dict[str, float] | None:
    """The most of each resource the autoscaler may grow the cluster to, from the limits it
    reports to the GCS (the check Ray Train itself makes before placing workers); None when
    none were reported (no autoscaler, or one that does not report limits): then waiting
    decides. The call is private to Ray, so any failure of it only means "unknown"."""
    try:
        from ray._private.state import state

        ceiling = state.get_max_resources_from_cluster_config()
    except Exception:
        return None
    return {k: float(v) for k, v in ceiling.items()} if ceiling else None


def _request(bundles: Sequence[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=list(bundles))


@dataclass
class Cluster:
    """The calls into Ray (and the clock) that the checks make; tests script their own."""

    resources: Callable[[], Resources] = _ray_totals
    ceiling: Callable[[], Resources | None] = autoscaler_ceiling
    request: Callable[[Sequence[dict[str, float]]], None] = _request
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    say: Callable[[str], None] = lambda line: print(line, flush=True)


def local_machine(num_cpus: float) -> Cluster:
    """This machine as the local Ray it is about to start will see it (``num_cpus``: what the
    launcher gives Ray; GPUs: the CUDA devices torch sees, which Ray counts the same way), so
    a local run that can never fit is refused before Ray starts and before data preparation."""

    def totals() -> dict[str, float]:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return {"CPU": float(num_cpus), "GPU": float(gpus)}

    return Cluster(resources=totals, ceiling=lambda: None)


def _never_fits(need: Need, have: Resources, fixed: bool) -> ConfigError:
    hint = "" if fixed else f" ({WAIT_FLAG} > 0 waits for an autoscaler to add nodes)"
    keys = sorted(need.totals)
    return ConfigError(
        f"{need.flags} needs {fmt(need.totals, keys)} but the Ray cluster has "
        f"{fmt(have, keys)}: {need.remedy}{hint}"
    )


@contextlib.contextmanager
def held(need: Need, wait_s: float, *, fixed: bool, cluster: Cluster | None = None) -> Iterator:
    """Make sure the cluster can hold ``need`` for the body of the ``with``.

    ``fixed``: the cluster cannot grow (a local Ray this process started): a shortfall fails
    at once. Otherwise the autoscaler is asked for the bundles and the call waits up to
    ``wait_s``; the request is withdrawn when the body ends, so that the autoscaler may
    scale the cluster down again afterwards.
    """
    c = cluster or Cluster()
    requested = ensure(need, wait_s, fixed=fixed, cluster=c)
    try:
        yield
    finally:
        if requested:
            c.request([])


def ensure(need: Need, wait_s: float, *, fixed: bool, cluster: Cluster) -> bool:
    """Return once the cluster holds ``need`` (True: the autoscaler was asked for it), or
    raise a one-line ConfigError naming the flags."""
    have = cluster.resources()
    if not missing(need.totals, have):
        return False
    if fixed or wait_s <= 0:
        raise _never_fits(need, have, fixed)
    ceiling = cluster.ceiling()
    if ceiling is not None:
        reach = {k: max(ceiling.get(k, 0.0), have.get(k, 0.0)) for k in need.totals}
        if missing(need.totals, reach):
            keys = sorted(need.totals)
            raise ConfigError(
                f"{need.flags} needs {fmt(need.totals, keys)} but the autoscaler can grow the "
                f"Ray cluster to {fmt(reach, keys)} at most: {need.remedy}"
            )
    cluster.request(need.bundles)
    try:
        _wait(need, wait_s, have, cluster)
    except BaseException:
        cluster.request([])
        raise
    return True


def _wait(need: Need, wait_s: float, have: Resources, cluster: Cluster) -> None:
    """Poll until ``need`` fits, with a progress line every REPORT_EVERY_S; ConfigError after
    ``wait_s`` seconds."""
    keys = sorted(need.totals)
    start = last = cluster.clock()
    cluster.say(
        f"resources: {need.flags} needs {fmt(need.totals, keys)}, the cluster has "
        f"{fmt(have, keys)}; asked the autoscaler, waiting up to {wait_s:g} s ({WAIT_FLAG})"
    )
    while True:
        now = cluster.clock()
        if now - start >= wait_s:
            raise ConfigError(
                f"{need.flags} needs {fmt(need.totals, keys)} but after {wait_s:g} s "
                f"({WAIT_FLAG}) the Ray cluster has {fmt(have, keys)}: raise {WAIT_FLAG} if "
                f"nodes are still starting, or {need.remedy}"
            )
        if now - last >= REPORT_EVERY_S:
            cluster.say(
                f"resources: still waiting ({now - start:.0f}/{wait_s:g} s): the cluster has "
                f"{fmt(have, keys)} of {fmt(need.totals, keys)}"
            )
            last = now
        cluster.sleep(min(POLL_S, max(0.0, wait_s - (now - start))))
        have = cluster.resources()
        if not missing(need.totals, have):
            cluster.say(f"resources: ready after {cluster.clock() - start:.0f} s")
            return


def worker_share(cfg: TrainConfig, budget: float, local: bool) -> tuple[float, int]:
    """(CPUs, torch threads) of one training worker when ``budget`` CPUs are left for a run's
    (or one sweep trial's) workers: ``--cpus_per_worker`` if given, else the budget split
    between ``--num_ray_workers``, between a quarter and one CPU each.

    A cluster whose budget cannot hold even quarter-CPU workers now (one that autoscales from
    no worker nodes: a 0-CPU head) must grow anyway, so it is planned at a whole CPU per
    worker, what it gets once grown, not at the quarter and one thread its empty state would
    suggest. (The launcher and the sweep both plan through here.)
    """
    n = cfg.ray.num_ray_workers
    if cfg.ray.cpus_per_worker is not None:
        cpw = cfg.ray.cpus_per_worker
    elif not local and budget < n * MIN_CPUS_PER_WORKER:
        cpw, budget = 1.0, n * 1.0  # the size it must grow to
    else:
        cpw = min(1.0, max(MIN_CPUS_PER_WORKER, budget / n))
    threads = 2 if cfg.ray.use_gpu else max(1, int(budget // n))
    return cpw, threads
