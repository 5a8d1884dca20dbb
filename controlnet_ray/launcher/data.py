"""The run's data on the driver: the shards (the embedded synthetic set or the user's
``--data_dir``, prepared once and cached), the judges trained on them, and the pair datasets
built from them. Reading and checking the data (:func:`locate_data`) is separate from
preparing it (:func:`prepare_data`) so that a run against a cluster checks before connecting
and prepares after, on the cluster's nodes: pose fitting and decode + align as Ray tasks
(``data.shards``), the judges' training as one Ray task (:func:`train_judges`). Whether work
goes to the cluster is decided in one place, ``data.pools.ray_cluster_cpus``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from controlnet_ray.config import TrainConfig

if TYPE_CHECKING:
    from controlnet_ray.data.pipeline import PairDatasets
    from controlnet_ray.data.shards.cache import ShardSource


@dataclass
class RunData:
    """The run's data after the checks before Ray: ``shards`` once prepared (None while a
    first-time preparation waits for the cluster connection)."""

    source: ShardSource
    shards: Path | None


def resolve_shards(cfg: TrainConfig) -> Path:
    """Shards for this run: the embedded synthetic set or the user's --data_dir, prepared once."""
    return locate_data(cfg).ensure()


def locate_data(cfg: TrainConfig) -> ShardSource:
    """The run's data read and checked (a DataError naming file, entry and field) and its shard
    cache found, nothing prepared yet: the embedded synthetic set (rendered on first use) or
    the user's --data_dir."""
    from controlnet_ray.data.shards.cache import locate_shards

    data = cfg.data
    if data.data_dir is None:
        from controlnet_ray.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

        spec = SyntheticSpec(
            num_identities=data.synthetic_identities,
            frames_per_identity=data.synthetic_frames,
            seed=data.synthetic_seed,
        )
        data_dir = ensure_synthetic_dataset(
            data.resolved_cache_dir(), spec, num_workers=max(1, data.num_workers)
        )
        print(
            f"data: embedded synthetic dataset ({spec.num_identities} identities x "
            f"{spec.frames_per_identity} frames) at {data_dir}",
            flush=True,
        )
        data = _replace_data_dir(cfg, str(data_dir))
    return locate_shards(data)


def prepare_data(cfg: TrainConfig, source: ShardSource) -> Path:
    """The shards (reused, or prepared: through Ray tasks when the driver is connected to a
    multi-node cluster) and, unless --no_judge, the held-out judges trained once on them."""
    shards = source.ensure()
    if not cfg.output.no_judge:  # trained once per dataset; the workers only load them
        train_judges(cfg, shards)
    return shards


def unprepared(cfg: TrainConfig, source: ShardSource) -> str | None:
    """What :func:`prepare_data` would still have to make (a line for the user), or None
    when the shards and (unless --no_judge) the judges are all cached."""
    if not source.cached:
        return f"shards: not prepared yet; preparing them at {source.target}"
    if cfg.output.no_judge:
        return None
    from controlnet_ray.judging import judges_cached

    if judges_cached(source.target, cfg.data.resolved_cache_dir()):
        return None
    return f"judges: not trained yet for the shards at {source.target}; training them"


def train_judges(cfg: TrainConfig, shards: Path) -> None:
    """Both judges of ``shards``, trained once into --cache_dir: connected to a multi-node
    cluster, as one Ray task on a node with CPUs (``--num_workers`` of them, at most a
    node's), never on the driver's 0-CPU head; here otherwise, or when already cached."""
    from controlnet_ray.data.pools import ray_call, ray_cluster_cpus, ray_task_cpus
    from controlnet_ray.judging import ensure_judges, judges_cached

    cache = cfg.data.resolved_cache_dir()
    if not ray_cluster_cpus() or judges_cached(shards, cache):
        ensure_judges(shards, cache, cfg.output.progress)
        return
    cpus = ray_task_cpus(max(1, cfg.data.num_workers))
    print(f"judges: training as a Ray task ({cpus} CPU) on the cluster", flush=True)
    node, _ = ray_call(_train_judges_here, str(shards), str(cache), cpus, num_cpus=cpus)
    print(f"judges: trained by a Ray task on node {node}", flush=True)


def _train_judges_here(shards: str, cache: str, threads: int) -> None:
    """The Ray task of :func:`train_judges`: torch on the CPUs Ray granted it; progress as
    lines (Ray forwards a task's output line by line, so a bar could not render)."""
    import torch

    from controlnet_ray.judging import ensure_judges

    torch.set_num_threads(threads)
    ensure_judges(shards, cache, "lines")


def _replace_data_dir(cfg: TrainConfig, data_dir: str):
    import dataclasses

    return dataclasses.replace(cfg.data, data_dir=data_dir, image_dir=None)


def build_pairs(cfg: TrainConfig, shards: Path) -> PairDatasets:
    """The pair datasets, built on the driver once per run (or once per sweep)."""
    from controlnet_ray.data.pipeline import build_pair_datasets

    pairs = build_pair_datasets(shards, cfg.data, seed=cfg.ray.seed)
    print(
        f"pairs: {pairs.num_train_pairs} train, {pairs.num_val_pairs} val "
        f"({cfg.data.pair_mode}, {cfg.data.min_pose_distance:g}-"
        f"{cfg.data.max_pose_distance:g} deg)",
        flush=True,
    )
    return pairs
