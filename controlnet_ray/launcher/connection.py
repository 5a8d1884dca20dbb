"""Connecting to Ray and what the driver learns from the cluster: the local Ray started (and
stopped) for a run, or the cluster joined, with what every Ray process of the run needs (Ray
Train v2, a quiet console); whether it has several nodes; whether every node sees a folder the
driver writes (checked before training, not after an epoch).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from controlnet_ray.config import ConfigError, TrainConfig

PROBE_TIMEOUT_S = 120.0  # for every node to answer whether it sees a path
TRAIN_V2 = "RAY_TRAIN_V2_ENABLED"  # Ray reads it when ray.train is imported; "1"/"true": v2
# Runs in every Ray worker process of the run (Ray's worker_process_setup_hook).
WORKER_SETUP_HOOK = "controlnet_ray.progress.quiet_ray_notices"


def check_train_v2() -> None:
    """Refuse, before any work, an environment that selects Ray Train v1: this project is
    written against Train v2 (``ray.train.UserCallback``, a trainer inside a Tune function),
    and v1 fails later with an ImportError that does not say why."""
    value = os.environ.get(TRAIN_V2)
    if value is not None and value.strip().lower() not in ("1", "true"):
        raise ConfigError(
            f"{TRAIN_V2}={value} in the environment selects Ray Train v1; this project "
            f"needs Train v2: unset {TRAIN_V2} or set it to 1"
        )


def run_runtime_env(local: bool) -> dict:
    """What every Ray process of the run is started with (``ray.init``'s ``runtime_env``).

    Train v2 is pinned: without ``RAY_TRAIN_V2_ENABLED`` in this environment it is set here
    (a local Ray inherits it) and given to the cluster's job, so nodes whose own environment
    says 0 still run v2. Set in this environment (a submitted job's runtime env, which Ray
    would refuse to see set twice) it is left to that environment (:func:`check_train_v2`).

    ``local``: the Ray this run starts, whose workers get the setup hook that drops Ray Data's
    notice that its progress bars are off. A joined cluster's job brings its own runtime env
    (``jobs/runtime_env.yaml`` sets the hook), which may be an image's: Ray allows nothing
    but env_vars beside an image, so the hook is not added to it here."""
    check_train_v2()
    env_vars = {} if TRAIN_V2 in os.environ else {TRAIN_V2: "1"}
    os.environ.setdefault(TRAIN_V2, "1")
    runtime_env: dict = {"worker_process_setup_hook": WORKER_SETUP_HOOK} if local else {}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


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
        check_train_v2()
        return False
    if joins_cluster(cfg):
        ray.init(
            address=cfg.ray.address or os.environ["RAY_ADDRESS"],
            log_to_driver=True,
            runtime_env=run_runtime_env(local=False) or None,
        )
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
        runtime_env = run_runtime_env(local=True)
        ray.init(address="local", num_cpus=plan_cpus, log_to_driver=True, runtime_env=runtime_env)
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

    context = ray.get_runtime_context()
    session = Path(context.get_temp_dir()) / context.get_session_name()
    ray.shutdown()
    if session.name.startswith("session_") and session.is_dir():
        shutil.rmtree(session, ignore_errors=True)
