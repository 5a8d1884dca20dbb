"""Pair index files: ``pairs-<pairing key>-<split>.parquet`` (source and target row numbers
within a split), written at preparation and made on first use for another pairing."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from controlnet_ray.config import DataConfig
from controlnet_ray.data.layout import DataError
from controlnet_ray.data.pairs import make_pairs
from controlnet_ray.data.shards.schema import _META_COLUMNS, PAIR_SCHEMA, _read_rows, split_files
from controlnet_ray.files import atomic_write

if TYPE_CHECKING:
    from controlnet_ray.data.shards.publish import _ShardWriter


@dataclass(frozen=True)
class PairRule:
    """Which pairs a preparation counts and indexes: ``--pair_mode`` and the pose-distance range
    in degrees (``--min_pose_distance``, ``--max_pose_distance``); named, so the three values
    threaded through the preparation cannot be swapped."""

    mode: str
    min_deg: float
    max_deg: float

    @classmethod
    def of(cls, data_cfg: DataConfig) -> PairRule:
        """The rule a data config asks for."""
        return cls(data_cfg.pair_mode, data_cfg.min_pose_distance, data_cfg.max_pose_distance)


def pair_index_name(split: str, mode: str, min_deg: float, max_deg: float) -> str:
    """File name of a split's pair index for one pairing (mode and pose-distance range).

    The range enters through ``float.hex`` so two ranges that print alike never share a file.
    """
    key = json.dumps([mode, float(min_deg).hex(), float(max_deg).hex()])
    return f"pairs-{mode}-{hashlib.sha256(key.encode()).hexdigest()[:8]}-{split}.parquet"


def _write_pair_index(path: Path, pairs: np.ndarray) -> None:
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    table = pa.table({"source": pairs[:, 0], "target": pairs[:, 1]}, schema=PAIR_SCHEMA)
    atomic_write(path, lambda f: pq.write_table(table, f))


def load_pair_index(
    shards_dir: str | Path,
    split: str,
    mode: str = DataConfig.pair_mode,
    min_deg: float = DataConfig.min_pose_distance,
    max_deg: float = DataConfig.max_pose_distance,
) -> np.ndarray:
    """[P, 2] int64 (source row, target row) pairs of ``split``; rows count from 0 over the
    split's shard files in manifest order (the order :func:`read_shard_table` returns).

    The preparation writes the index for the pairing it was given. Shards are cached per
    source and framing, not per pairing (a run with another ``--pair_mode`` or distance range
    reuses them), so another pairing's index is made here from the five small metadata
    columns -- never the image bytes -- and saved beside the others (an atomic write: runs
    that race write the same bytes). Same pairs, same order as :func:`make_pairs` on the
    split's rows: ordered by person (first appearance), then source, then target.
    """
    path = Path(shards_dir) / pair_index_name(split, mode, min_deg, max_deg)
    if not path.is_file():
        rows = _read_rows(Path(shards_dir), split_files(shards_dir, split), _META_COLUMNS)
        pairs = make_pairs(rows, mode, min_deg, max_deg)
        try:
            _write_pair_index(path, pairs)
        except OSError as exc:  # a read-only cache: the same pairs, just not kept
            print(f"note: {exc}; pairs computed for this run only", file=sys.stderr)
            return pairs
    table = pq.read_table(path)
    if table.schema != PAIR_SCHEMA:
        raise DataError(f"{path}: not a pair index (columns {table.column_names})")
    return np.stack([table.column(c).to_numpy() for c in ("source", "target")], 1)


def _write_pair_indexes(out: Path, writers: dict[str, _ShardWriter], pairing: PairRule) -> None:
    """Every split's pair index for the prepared pairing, from the rows just written."""
    for split, writer in writers.items():
        rows = _read_rows(out, writer.files, _META_COLUMNS)
        mode, lo, hi = pairing.mode, pairing.min_deg, pairing.max_deg
        _write_pair_index(
            out / pair_index_name(split, mode, lo, hi), make_pairs(rows, mode, lo, hi)
        )
