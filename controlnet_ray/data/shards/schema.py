"""What a shard directory holds and how it is read: the Parquet schemas, ``manifest.json``
(:class:`Manifest`), and the readers of a published directory (manifest, rows, split files).

The on-disk format's version (``SCHEMA_VERSION``) lives here and enters the cache key
(:func:`controlnet_ray.data.shards.fingerprint.settings_hash`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from controlnet_ray.data.layout import DataError
from controlnet_ray.data.pairs import SPLITS

# 2: head-centred framing, landmarks in crop pixels; 3: pair index files; 4: unusual entries
# kept and listed (``unusual``), no longer skipped
SCHEMA_VERSION = 4
MAX_ROWS_PER_SHARD = 2000
MANIFEST = "manifest.json"
PAIR_SCHEMA = pa.schema([("source", pa.int64()), ("target", pa.int64())])
_META_COLUMNS = ["person_name", "role", "yaw", "pitch", "roll"]  # what pairing reads
SHARD_SCHEMA = pa.schema(
    [
        ("person_name", pa.string()),
        ("split", pa.string()),
        ("role", pa.string()),
        ("frame_index", pa.int32()),
        ("image_path", pa.string()),
        ("image", pa.binary()),
        ("keypoints", pa.list_(pa.float32(), 15)),
        ("landmarks", pa.list_(pa.float32(), 10)),  # the five landmarks in crop pixels
        ("yaw", pa.float32()),
        ("pitch", pa.float32()),
        ("roll", pa.float32()),
    ]
)
ALIGNMENTS = {
    "head": (
        "head-centred: centre = projected head centre of the fitted 3D pose "
        "(align.HEAD_CENTER_MM), side = 2 * align.HEAD_HALF_SIZE_MM at its depth, upright "
        "(roll stays in the image), RGB, PNG, black outside the source image"
    ),
    "arcface": (
        "ArcFace 5-point similarity (insightface.utils.face_align.estimate_norm; 112 template "
        "scaled by image_size/112), RGB, PNG, black outside the source image"
    ),
}


@dataclass
class Manifest:
    """``manifest.json`` of a shard directory."""

    schema_version: int
    image_size: int
    fingerprint: str
    data_dir: str
    image_root: str
    split_ratios: list[float]
    counts: dict[str, dict[str, int]]
    shards: dict[str, list[str]]
    pose_report: dict[str, Any]
    pairs: dict[str, Any]
    persons_without_video: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    skipped_count: int = 0
    unusual: list[dict[str, Any]] = field(default_factory=list)  # kept rows of unusual geometry
    conventions: str = ""
    alignment: str = ALIGNMENTS["head"]
    framing: str = "head"
    split_rule: int = 1  # data.pairs.SPLIT_RULE when prepared; absent (1) before it existed
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------------ reading


def load_manifest(shards_dir: str | Path) -> Manifest:
    """The manifest of a shard directory (DataError if absent or of another schema)."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; not a shard directory (run controlnet_ray.prepare)")
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path}: shard schema version {doc.get('schema_version')} != {SCHEMA_VERSION}; "
            "prepare the shards again"
        )
    return Manifest.from_dict(doc)


def read_shard_table(
    shards_dir: str | Path, split: str | None = None, columns: Sequence[str] | None = None
) -> pa.Table:
    """All rows (or one split's) as one pyarrow Table, shard order preserved."""
    manifest = load_manifest(shards_dir)
    splits = SPLITS if split is None else (split,)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = [Path(shards_dir) / f for s in splits for f in manifest.shards.get(s, [])]
    cols = list(columns) if columns is not None else None
    tables = [pq.read_table(f, columns=cols) for f in files]
    if not tables:
        schema = SHARD_SCHEMA if cols is None else pa.schema([SHARD_SCHEMA.field(c) for c in cols])
        return schema.empty_table()
    return pa.concat_tables(tables)


def _read_rows(shards_dir: Path, files: Sequence[str], columns: Sequence[str]) -> pa.Table:
    tables = [pq.read_table(shards_dir / f, columns=list(columns)) for f in files]
    if not tables:
        return pa.schema([SHARD_SCHEMA.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)


def split_files(shards_dir: str | Path, split: str) -> list[Path]:
    """The image Parquet files of one split, in row order (from the manifest)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = load_manifest(shards_dir)
    return [Path(shards_dir) / f for f in manifest.shards.get(split, [])]
