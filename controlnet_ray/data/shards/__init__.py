"""Legacy layout -> aligned-crop Parquet shards + manifest, with a fingerprinted cache.

Decoding the source JPEGs and aligning faces is the expensive part of the data path, so it is
done once, in parallel, into Parquet (one row per aligned image, rows grouped by split,
``<split>-NNNNN.parquet`` with at most ``MAX_ROWS_PER_SHARD`` rows) that the Ray Data
pipeline reads. Beside the images, each split's training pairs are written once as an index
(``pairs-<pairing key>-<split>.parquet``: ``source``, ``target`` = row numbers within the
split, in shard order; see :func:`load_pair_index`), so no run ever groups or shuffles image
bytes to form pairs, and each image is stored once however many pairs use it. Poses come from
:func:`controlnet_ray.data.pose.estimate_dataset_poses` (the legacy angles are unusable);
they are estimated from all landmarks before decoding,
so an image later skipped as corrupt still informed its person's bundle adjustment (its
landmarks came from a successful detection by the original script). Everything is written
to a temporary sibling directory and renamed into place only when complete and checked, so on
any error no partial shard directory remains and a previous good one is untouched.

Cache (``ensure_shards``): ``<cache>/shards/<fingerprint>-<image_size>-<settings hash>``. The
source fingerprint (``fingerprint_source``) hashes the bytes of the two JSON and two npy files
plus every image's relative path, size and mtime -- a stat, not a read, so it costs ~1 s per
100k images while still noticing replaced or touched images. The settings hash covers the
normalised split ratios, the split rule (``data.pairs.SPLIT_RULE``), the framing and the shard
schema version (3 since the pair index): older caches are rebuilt, never misread, and a split
made by an earlier rule is never reused as this rule's.

Modules: ``schema`` (Parquet schemas, manifest, readers), ``fingerprint`` (cache keys),
``align_workers`` (decode + align in processes or Ray tasks), ``publish`` (Parquet writer,
atomic publish, ``write_shard_dir``), ``pair_index`` (pair index files), ``preparation``
(legacy layout -> shards), ``cache`` (``ensure_shards``). The names below are re-exported so
``controlnet_ray.data.shards.<name>`` keeps working.
"""

from controlnet_ray.data.pairs import SPLITS
from controlnet_ray.data.shards.cache import ensure_shards
from controlnet_ray.data.shards.fingerprint import fingerprint_source
from controlnet_ray.data.shards.pair_index import load_pair_index, pair_index_name
from controlnet_ray.data.shards.preparation import prepare_shards
from controlnet_ray.data.shards.publish import write_shard_dir
from controlnet_ray.data.shards.schema import (
    MANIFEST,
    SCHEMA_VERSION,
    load_manifest,
    read_shard_table,
    split_files,
)

__all__ = [
    "MANIFEST",
    "SCHEMA_VERSION",
    "SPLITS",
    "ensure_shards",
    "fingerprint_source",
    "load_manifest",
    "load_pair_index",
    "pair_index_name",
    "prepare_shards",
    "read_shard_table",
    "split_files",
    "write_shard_dir",
]
