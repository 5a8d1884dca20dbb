"""The run's data on the driver: the shards (the embedded synthetic set or the user's
``--data_dir``, prepared once and cached), the judges trained on them, and the pair datasets
built from them. Reading and checking the data (:func:`locate_data`) is separate from
preparing it (:func:`prepare_data`) so that a run against a cluster checks before connecting
and prepares after, on the cluster's nodes.
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
    if not cfg.output.no_judge:  # trained once per dataset, on the driver; the worker loads them
        from controlnet_ray.judging import ensure_judges

        ensure_judges(shards, cfg.data.resolved_cache_dir())
    return shards


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
