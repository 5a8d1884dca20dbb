"""The shard cache: ``<cache>/shards/<fingerprint>-<image_size>-<settings hash>``, reused when
the source and settings are unchanged (still enforcing this run's flags), else prepared."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from controlnet_ray.config import DataConfig
from controlnet_ray.data.layout import (
    DataError,
    LegacyDataset,
    SkippedImage,
    describe_bad_images,
    read_legacy_dataset,
)
from controlnet_ray.data.pairs import SPLIT_RULE, count_split_pairs, required_splits
from controlnet_ray.data.shards.fingerprint import _fingerprint, settings_hash
from controlnet_ray.data.shards.pair_index import PairRule
from controlnet_ray.data.shards.preparation import (
    _prepare,
    preparation_workers,
    warn_few_persons,
)
from controlnet_ray.data.shards.schema import (
    MANIFEST,
    SCHEMA_VERSION,
    load_manifest,
    read_shard_table,
)


def shard_cache_dir(data_cfg: DataConfig, fingerprint: str) -> Path:
    """``<cache>/shards/<fingerprint[:16]>-<image_size>-<settings hash>``."""
    settings = settings_hash(data_cfg.split_ratios, data_cfg.framing)
    key = f"{fingerprint[:16]}-{data_cfg.image_size}-{settings}"
    return data_cfg.resolved_cache_dir() / "shards" / key


def ensure_shards(
    data_cfg: DataConfig, num_workers: int | None = None, cwd: str | Path | None = None
) -> Path:
    """Shard directory for ``data_cfg.data_dir``: reused when the source is unchanged, else made.

    Reuse still enforces this run's flags: shards that skipped images are refused without
    ``skip_bad_images``, and pairs are recounted for this run's pair mode/range.
    """
    return locate_shards(data_cfg, cwd).ensure(num_workers)


@dataclass
class ShardSource:
    """A legacy dataset read and checked (JSON, npy, image paths), its cache folder, and
    whether that folder already holds usable shards. Splitting :func:`ensure_shards` in two
    lets training read and check the data before connecting to a cluster and prepare it
    after, through Ray tasks on the cluster's nodes."""

    data_cfg: DataConfig
    ds: LegacyDataset
    fingerprint: str
    target: Path
    cached: bool

    def ensure(self, num_workers: int | None = None) -> Path:
        """The shard folder: reused when cached, else prepared (decoding and aligning in Ray
        tasks when this process is connected to a multi-node cluster, else locally)."""
        if self.cached:
            print(f"reusing shards at {self.target}")
            counts = load_manifest(self.target).counts
            persons = {s: c["persons"] for s, c in counts.items() if s != "total"}
            warn_few_persons(persons, self.data_cfg.split_ratios)
            return self.target
        cfg = self.data_cfg
        print(f"preparing shards at {self.target}")
        _prepare(
            self.ds,
            self.target,
            cfg.image_size,
            preparation_workers(cfg, num_workers),
            cfg.skip_bad_images,
            cfg.split_ratios,
            PairRule.of(cfg),
            fingerprint=self.fingerprint,
            framing=cfg.framing,
        )
        return self.target


def locate_shards(data_cfg: DataConfig, cwd: str | Path | None = None) -> ShardSource:
    """Read and check ``data_cfg.data_dir`` (a DataError naming file, entry and field) and find
    its cache folder; a cached one is checked against this run's flags (see ensure_shards)."""
    if data_cfg.data_dir is None:
        raise ValueError("ensure_shards needs data_cfg.data_dir (a legacy data directory)")
    ds = read_legacy_dataset(
        data_cfg.data_dir, data_cfg.image_dir, skip_bad_images=data_cfg.skip_bad_images, cwd=cwd
    )
    fp = _fingerprint(ds.data_dir, ds.image_root_used, ds.source_image_paths)
    target = shard_cache_dir(data_cfg, fp)
    cached = _reusable(target, fp, data_cfg, PairRule.of(data_cfg))
    return ShardSource(data_cfg, ds, fp, target, cached)


def _reusable(target: Path, fingerprint: str, data_cfg: DataConfig, pairing: PairRule) -> bool:
    if not (target / MANIFEST).is_file():
        return False
    try:
        manifest = load_manifest(target)
    except (DataError, json.JSONDecodeError):
        return False
    if manifest.fingerprint != fingerprint or manifest.image_size != data_cfg.image_size:
        return False
    if manifest.schema_version != SCHEMA_VERSION or manifest.framing != data_cfg.framing:
        return False
    if manifest.split_rule != SPLIT_RULE:  # the key has it too; a hand-made folder may not
        return False
    if manifest.skipped_count and not data_cfg.skip_bad_images:
        bad = [SkippedImage(**s) for s in manifest.skipped]
        total = manifest.counts["total"]["images"] + len(bad)
        message = describe_bad_images(bad, total, Path(manifest.image_root))
        raise DataError(f"{message}. Pass --skip_bad_images to skip them.")
    table = read_shard_table(
        target, columns=["person_name", "split", "role", "yaw", "pitch", "roll"]
    )
    rows = table.to_pydict()
    required = required_splits(data_cfg.split_ratios)
    mode, lo, hi = pairing.mode, pairing.min_deg, pairing.max_deg
    count_split_pairs(rows, rows["split"], mode, lo, hi, required=required)
    return True
