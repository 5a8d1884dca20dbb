"""Writing and publishing a shard directory: the per-split Parquet writer, the atomic swap of a
whole directory into place, and :func:`write_shard_dir` for crops made elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from controlnet_ray.config import DataConfig
from controlnet_ray.data.layout import DataError
from controlnet_ray.data.pairs import SPLITS
from controlnet_ray.data.shards.pair_index import PairRule, _write_pair_indexes, pair_index_name
from controlnet_ray.data.shards.schema import (
    ALIGNMENTS,
    MANIFEST,
    MAX_ROWS_PER_SHARD,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    Manifest,
)


class _ShardWriter:
    """Buffers rows of one split and flushes ``<split>-NNNNN.parquet`` every N rows."""

    def __init__(self, out_dir: Path, split: str, max_rows: int) -> None:
        self.out_dir, self.split, self.max_rows = out_dir, split, max_rows
        self.rows: list[dict[str, Any]] = []
        self.files: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.split}-{len(self.files):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=SHARD_SCHEMA)
        pq.write_table(
            table, self.out_dir / name, compression={"image": "NONE"}, row_group_size=500
        )
        self.files.append(name)
        self.rows = []


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())


def write_shard_dir(
    out: str | Path,
    rows: Sequence[dict[str, Any]],
    image_size: int,
    pairing: tuple[str, float, float] = (
        DataConfig.pair_mode,
        DataConfig.min_pose_distance,
        DataConfig.max_pose_distance,
    ),
    *,
    fingerprint: str = "rows",
    framing: str = DataConfig.framing,
    max_rows: int = MAX_ROWS_PER_SHARD,
) -> Manifest:
    """Publish crops that already exist (``SHARD_SCHEMA`` rows, each with its ``split``) as a
    shard directory -- Parquet files in split order, pair indexes, manifest -- atomically.

    The same writer and index as :func:`prepare_shards`, without reading a legacy layout:
    for data made elsewhere (synthetic scale benchmarks, tests). Poses are taken as given.
    ``pairing`` (mode, min, max degrees) and ``framing`` default to DataConfig's.
    """
    out = Path(out)
    rule = PairRule(*pairing)
    _refuse_foreign_dir(out)
    ordered = sorted(rows, key=lambda r: SPLITS.index(r["split"]))
    tmp = _temp_dir(out)
    try:
        writers = {s: _ShardWriter(tmp, s, max_rows) for s in SPLITS}
        for r in ordered:
            writers[r["split"]].add(r)
        for w in writers.values():
            w.flush()
        _write_pair_indexes(tmp, writers, rule)
        manifest = _rows_manifest(ordered, writers, image_size, rule, fingerprint, framing)
        manifest.pairs["per_split"] = {
            s: len(pq.read_table(tmp / pair_index_name(s, rule.mode, rule.min_deg, rule.max_deg)))
            for s in SPLITS
        }
        _write_json(tmp / MANIFEST, manifest.to_dict())
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _rows_manifest(
    rows: Sequence[dict[str, Any]],
    writers: dict[str, _ShardWriter],
    image_size: int,
    pairing: PairRule,
    fingerprint: str,
    framing: str,
) -> Manifest:
    counts: dict[str, dict[str, int]] = {}
    for split in (*SPLITS, "total"):
        sel = [r for r in rows if split == "total" or r["split"] == split]
        roles = [r["role"] for r in sel]
        counts[split] = {
            "persons": len({r["person_name"] for r in sel}),
            "images": len(sel),
            "front": roles.count("front"),
            "video": roles.count("video"),
        }
    mode, lo, hi = pairing.mode, pairing.min_deg, pairing.max_deg
    persons = sorted({r["person_name"] for r in rows})
    ratios = [counts[s]["persons"] / max(len(persons), 1) for s in SPLITS]
    return Manifest(
        schema_version=SCHEMA_VERSION,
        image_size=image_size,
        fingerprint=fingerprint,
        data_dir="",
        image_root="",
        split_ratios=ratios,
        counts=counts,
        shards={s: w.files for s, w in writers.items()},
        pose_report={},
        pairs={"mode": mode, "min_deg": lo, "max_deg": hi, "per_split": {}},
        alignment=ALIGNMENTS[framing],
        framing=framing,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def _refuse_foreign_dir(out: Path) -> None:
    """Never replace a non-empty directory that is not a shard directory (it may be user data)."""
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())
    ):
        raise DataError(f"--out {out} exists and is not a shard directory; refusing to replace it")


def _temp_dir(out: Path) -> Path:
    """Fresh sibling temp dir (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _remove_stale(out: Path) -> None:
    """Delete temp/old siblings left by killed runs (their process no longer exists)."""
    for prefix in (f".{out.name}.tmp-", f".{out.name}.old-"):
        for p in out.parent.glob(prefix + "*"):
            pid = p.name[len(prefix) :].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is swapped aside first and restored on failure.

    Not :func:`controlnet_ray.files.atomic_write`: that replaces one *file*, and ``os.replace``
    cannot rename a directory over a non-empty one, so a whole shards *directory* is swapped
    in two renames (readers see the old set, briefly none, then the new one; never a mix)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
