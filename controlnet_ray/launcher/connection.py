"""Connecting to Ray and what the driver learns from the cluster: the local Ray started (and
stopped) for a run, or the cluster joined; whether it has several nodes; whether every node
sees a folder the driver writes (checked before training, not after an epoch).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from controlnet_ray.config import ConfigError, TrainConfig

PROBE_TIMEOUT_S = 120.0  # for every node to answer whether it sees a path


def joins_cluster(cfg: TrainConfig) -> bool:
    """Whether this run joins an existing cluster (--address or $RAY_ADDRESS) rather than
    starting a local Ray of its own size."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def init_ray(cfg: TrainConfig, plan_cpus: int | None) -> bool:
    """Connect to --address/$RAY_ADDRESS, or start a local Ray sized by the plan; True when
    this call started a local Ray (its caller then owns its shutdown)."""
    import ray

    # A local Ray's processes inherit these: Ray Data's actors then log warnings only.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if ray.is_initialized():
        return False
    if joins_cluster(cfg):
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    else:
        # A local Ray shares the machine with the training workers: without Prometheus metrics
        # collection and event-loop stats its processes use measurably less CPU (2 DDP workers
        # on 2 cores got 86 % of a core each instead of 80 %). The environment can override.
        for name in ("RAY_enable_metrics_collection", "RAY_event_stats"):
            os.environ.setdefault(name, "false")
        # Ray Data reads Parquet footers with up to 32 actors, each holding a CPU: on a small
        # machine they starve the training workers. A cluster keeps Ray's default.
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
        # The dashboard is kept (the default): Ray's State API behind it cleans up the placement
        # groups of finished or stopped runs.
        # address="local": always a new Ray of this run's size. Without it ray.init() joins
        # whatever cluster /tmp/ray/ray_current_cluster names (a `ray start` left running on
        # the machine), and then fails on num_cpus.
        ray.init(address="local", num_cpus=plan_cpus, log_to_driver=True)
        return True


def cluster_is_multi_node() -> bool:
    """More than one live node, or a driver's node that hosts no worker (a head with 0 CPUs,
    as the shipped manifests start it): then rank 0 runs elsewhere and local paths differ."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    mine = [n for n in nodes if n.get("NodeID") == here]
    return len(nodes) > 1 or any(n.get("Resources", {}).get("CPU", 0) == 0 for n in mine)


def _path_exists(path: str) -> bool:
    return os.path.exists(path)


def nodes_missing(folder: str) -> list[str]:
    """Addresses of live nodes that do not see ``folder`` as the driver does: a marker
    written here is looked for there (a zero-CPU task pinned to each node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = Path(folder) / f".controlnet_ray_probe_{uuid.uuid4().hex}"
    marker.write_bytes(b"")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(num_cpus=0)(_path_exists)
        refs = [
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        ]
        seen = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    finally:
        marker.unlink(missing_ok=True)
    return [
        n.get("NodeManagerAddress", n["NodeID"])
        for n, ok in zip(nodes, seen, strict=True)
        if not ok
    ]


SHARED_HINT = "use s3://..., gs://... or a folder every node mounts (NFS)"


def check_cluster_paths(cfg: TrainConfig, given_storage_path: str | None) -> None:
    """On a multi-node cluster, refuse before training the paths other nodes cannot see:
    Ray's checkpoint upload would otherwise fail on rank 0's node after a whole epoch, and the
    cache (shards, judge) would be read from a disk only the driver has.

    ``given_storage_path``: --storage_path as typed (None: the default under --save_dir)."""
    if not cluster_is_multi_node():
        return
    storage = cfg.storage_path()
    if given_storage_path is None:
        raise ConfigError(
            f"this Ray cluster has several nodes: pass --storage_path (the default, {storage}, "
            f"is a folder on the driver's disk, which rank 0's node does not have); {SHARED_HINT}"
        )
    if "://" not in given_storage_path and not Path(given_storage_path).expanduser().is_absolute():
        raise ConfigError(
            f"--storage_path {given_storage_path} is relative to the driver's working folder, "
            f"which other nodes do not have; {SHARED_HINT}"
        )
    folders = [("--cache_dir", str(cfg.data.resolved_cache_dir()))]
    if "://" not in storage:
        folders.insert(0, ("--storage_path", storage))
    for flag, folder in folders:
        missing = nodes_missing(folder)
        if missing:
            raise ConfigError(
                f"{flag} {folder} is not shared: node(s) {', '.join(missing)} do not see it; "
                f"{SHARED_HINT}"
                + (" (or set CONTROLNET_RAY_CACHE)" if flag == "--cache_dir" else "")
            )


def shutdown_local_ray() -> None:
    """Stop the local Ray this run started and delete its session folder (logs, sockets;
    ~2 MB a run, never pruned by Ray). Only after a successful run: a failed one keeps its
    logs for diagnosis."""
    import ray

    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
    except AttributeError:  # Ray's private layout changed: leave the folder alone
        session = None
    ray.shutdown()
    if session is not None and session.name.startswith("session_"):
        shutil.rmtree(session, ignore_errors=True)
