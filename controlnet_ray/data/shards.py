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
normalised split ratios and the shard schema version (3 since the pair index: older caches
are rebuilt, never misread).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from controlnet_ray.config import DataConfig
from controlnet_ray.data import geometry
from controlnet_ray.data.align import (
    FRAMINGS,
    alignment_matrix,
    crop,
    crop_inside_fraction,
    head_crop_matrix,
)
from controlnet_ray.data.layout import (
    FRONT_METADATA,
    SOURCE_FILES,
    VIDEO_METADATA,
    DataError,
    LegacyDataset,
    SkippedImage,
    describe_bad_images,
    read_legacy_dataset,
)
from controlnet_ray.data.pairs import (
    SPLITS,
    count_split_pairs,
    make_pairs,
    normalise_ratios,
    persons_without_video,
    required_splits,
    split_persons,
    split_summary,
)
from controlnet_ray.files import atomic_write

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: head-centred framing, landmarks in crop pixels; 3: pair index files
MAX_ROWS_PER_SHARD = 2000
MANIFEST = "manifest.json"
_CHUNK = 32  # images per worker task: amortises IPC, keeps the progress bar moving
_MIN_IMAGES_FOR_POOL = 1000  # ~3 s of inline work: below it, spawning workers costs more
_MIN_PERSONS_FOR_POSE_POOL = 16  # same for the per-person bundle adjustment
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
MIN_INSIDE_FRACTION = 0.5  # a crop mostly outside its source image is a data error


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
    conventions: str = ""
    alignment: str = ALIGNMENTS["head"]
    framing: str = "head"
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# ------------------------------------------------------------------------------ fingerprint


def fingerprint_source(data_dir: str | Path, image_root: str | Path) -> str:
    """sha256 over the 4 metadata/keypoint files' bytes and each image's path, size, mtime.

    Images are stat-ed, not read (fast); a missing image is hashed as missing, so restoring it
    changes the fingerprint.
    """
    ddir = Path(data_dir)
    paths = []
    for name in (FRONT_METADATA, VIDEO_METADATA):
        with open(ddir / name, encoding="utf-8") as f:
            paths += [str(m.get("image_path", "")) for m in json.load(f).get("metadata", [])]
    return _fingerprint(ddir, Path(image_root), paths)


def _fingerprint(ddir: Path, root: Path, image_paths: Sequence[str]) -> str:
    h = hashlib.sha256(b"controlnet-ray-source-v1\n")
    for name in SOURCE_FILES:
        h.update(name.encode() + b"\0" + _file_digest(ddir / name).encode() + b"\n")
    for raw in image_paths:
        rel = raw.replace("\\", "/")
        try:
            st = os.stat(root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings_hash(split_ratios: Sequence[float], framing: str = "head") -> str:
    """8 hex digits of the normalised ratios, framing and schema version (part of the cache key);
    a schema change therefore rebuilds old caches instead of misreading them."""
    doc = {
        "ratios": [round(r, 9) for r in normalise_ratios(split_ratios)],
        "v": SCHEMA_VERSION,
        "framing": framing,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------ workers


def _init_worker() -> None:
    """One OpenCV thread per process: parallelism comes from the processes."""
    cv2.setNumThreads(1)


def _decode_rgb(path: str, expected: tuple[int, int]) -> np.ndarray:
    """Full decode with PIL (raises on truncated JPEGs, which OpenCV would half-decode)."""
    with Image.open(path) as im:
        if tuple(im.size) != tuple(expected):
            raise ValueError(f"decoded size {im.size[0]}x{im.size[1]} != metadata image_size")
        im.load()
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _align_one(path: str, matrix: np.ndarray, size: tuple[int, int], image_size: int) -> bytes:
    rgb = crop(_decode_rgb(path, size), matrix, image_size)
    ok, buf = cv2.imencode(
        ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]
    )
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _align_chunk(task: tuple[list[tuple], int]) -> list[tuple[int, bytes | None, str | None]]:
    """(row, png bytes or None, error or None) for each image of a chunk."""
    items, image_size = task
    out = []
    for row, path, matrix, size in items:
        try:
            out.append((row, _align_one(path, matrix, size, image_size), None))
        except Exception as exc:  # noqa: BLE001 - any decode failure is a bad image, reported
            out.append((row, None, f"{type(exc).__name__}: {exc}"))
    return out


def _align_chunk_one_thread(task: tuple[list[tuple], int]) -> list:
    """:func:`_align_chunk` in a Ray task: one OpenCV thread, as Ray granted one CPU."""
    _init_worker()
    return _align_chunk(task)


def _run_alignment(
    tasks: list[tuple[list[tuple], int]], num_workers: int, total: int
) -> Iterator[tuple[int, bytes | None, str | None]]:
    """Results in task order; a process pool when num_workers > 1, else inline."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="decode+align", unit="img", file=sys.stderr, mininterval=1.0)
    try:
        cluster_cpus = _ray_cluster_cpus()
        if cluster_cpus:
            yield from _tick(_windowed_ray(tasks, 2 * cluster_cpus), bar)
            return
        if num_workers <= 1 or total < _MIN_IMAGES_FOR_POOL:
            yield from _tick(map(_align_chunk, tasks), bar)
            return
        ctx = mp.get_context("spawn")  # fork is unsafe once Ray/torch threads exist
        with cf.ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker) as ex:
            try:
                yield from _tick(_windowed(ex, tasks, 4 * num_workers), bar)
            except BaseException:
                ex.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


def _windowed(ex: cf.Executor, tasks: list, window: int) -> Iterator[list]:
    """Ordered results with at most ``window`` chunks in flight, so memory stays bounded."""
    pending: deque[cf.Future] = deque()
    remaining = iter(tasks)
    for task in itertools.islice(remaining, window):
        pending.append(ex.submit(_align_chunk, task))
    while pending:
        result = pending.popleft().result()
        task = next(remaining, None)
        if task is not None:
            pending.append(ex.submit(_align_chunk, task))
        yield result


def _ray_cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to, when it has several nodes
    (0 otherwise: no Ray, or one machine, where the process pool does the same job without
    Ray's per-task cost). Never starts Ray."""
    if "ray" not in sys.modules:
        return 0
    import ray

    if not ray.is_initialized():
        return 0
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
    if len(nodes) < 2:
        return 0
    return int(sum(n["Resources"]["CPU"] for n in nodes))


def _windowed_ray(tasks: list, window: int) -> Iterator[list]:
    """:func:`_windowed` over a Ray cluster: each chunk of images is decoded and aligned by a
    Ray task on whichever node has a CPU (``SPREAD``), results in task order, at most
    ``window`` chunks in flight. Every node must see the source images at the same paths
    (a shared mount, as ``--cache_dir`` already must be); the crops (PNG, a few KB each)
    come back to this process, which writes the shards as before, so the files, their
    order and the checks are those of a local preparation."""
    import ray

    remote = ray.remote(_align_chunk_one_thread).options(num_cpus=1, scheduling_strategy="SPREAD")
    pending: deque = deque()
    remaining = iter(tasks)
    for task in itertools.islice(remaining, window):
        pending.append(remote.remote(task))
    while pending:
        result = ray.get(pending.popleft())
        task = next(remaining, None)
        if task is not None:
            pending.append(remote.remote(task))
        yield result


def _tick(results: Iterator, bar) -> Iterator[tuple[int, bytes | None, str | None]]:
    for chunk in results:
        bar.update(len(chunk))
        yield from chunk


# ------------------------------------------------------------------------------ writing


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


def _row(ds: LegacyDataset, i: int, plan: _Plan, png: bytes) -> dict[str, Any]:
    e, pose, m = ds.entries[i], plan.poses[i], plan.matrices[i]
    landmarks = np.asarray(e.landmarks_2d, np.float64).reshape(5, 2) @ m[:, :2].T + m[:, 2]
    return {
        "person_name": e.person_name,
        "split": plan.splits[i],
        "role": e.role,
        "frame_index": int(e.frame_index),
        "image_path": e.image_path,
        "image": png,
        "keypoints": e.keypoints.reshape(15).astype(np.float32).tolist(),
        "landmarks": landmarks.reshape(10).astype(np.float32).tolist(),
        "yaw": float(pose[0]),
        "pitch": float(pose[1]),
        "roll": float(pose[2]),
    }


# ------------------------------------------------------------------------------ preparation


@dataclass
class _Plan:
    """Split assignment, poses and row order decided before any image is decoded."""

    splits: list[str]  # per dataset entry
    poses: np.ndarray  # [N,3]
    pose_report: dict[str, Any]
    order: list[int]  # entry indices grouped by split
    ratios: tuple[float, float, float]
    framing: str
    matrices: np.ndarray  # [N,2,3] source image -> crop
    framing_errors: dict[int, str]  # entries that cannot be cropped -> reason


def prepare_shards(
    data_dir: str | Path,
    out_dir: str | Path,
    image_dir: str | Path | None = None,
    image_size: int = 112,
    num_workers: int = 2,
    skip_bad_images: bool = False,
    split_ratios: Sequence[float] = (0.7, 0.15, 0.15),
    *,
    pair_mode: str = "front_to_video",
    min_pose_distance: float = 5.0,
    max_pose_distance: float = 90.0,
    framing: str = "head",
    cwd: str | Path | None = None,
) -> Manifest:
    """Read, validate, split, estimate poses, align and publish shards atomically at out_dir.

    Fails (DataError) before publishing when images are missing/corrupt (unless
    ``skip_bad_images``) or when a split with a positive ratio has no pairs under
    ``pair_mode``/distance range; the manifest records the pair counts.
    """
    ds = read_legacy_dataset(data_dir, image_dir, skip_bad_images=skip_bad_images, cwd=cwd)
    return _prepare(
        ds,
        Path(out_dir),
        image_size,
        num_workers,
        skip_bad_images,
        split_ratios,
        (pair_mode, min_pose_distance, max_pose_distance),
        framing=framing,
    )


def _prepare(
    ds: LegacyDataset,
    out: Path,
    image_size: int,
    num_workers: int,
    skip_bad_images: bool,
    split_ratios: Sequence[float],
    pairing: tuple[str, float, float],
    fingerprint: str | None = None,
    framing: str = "head",
) -> Manifest:
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    if not ds.entries:
        raise DataError(f"{ds.data_dir}: the dataset has no usable images")
    _refuse_foreign_dir(out)
    print(f"image root: {ds.image_root_used}")
    plan = _plan(ds, split_ratios, pairing, num_workers, image_size, framing)
    fp = fingerprint or _fingerprint(ds.data_dir, ds.image_root_used, ds.source_image_paths)
    tmp = _temp_dir(out)
    try:
        manifest = _write_all(ds, plan, tmp, image_size, num_workers, skip_bad_images, pairing, fp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_files = sum(len(f) for f in manifest.shards.values())
    print(f"wrote {manifest.counts['total']['images']} rows in {n_files} shards to {out}")
    return manifest


def _plan(
    ds: LegacyDataset,
    split_ratios: Sequence[float],
    pairing: tuple[str, float, float],
    workers: int,
    image_size: int,
    framing: str,
) -> _Plan:
    """Split by person, estimate poses, frame every crop, check every split has pairs."""
    from controlnet_ray.data.pose import estimate_dataset_poses

    ratios = normalise_ratios(split_ratios)
    names, roles = ds.person_names(), ds.roles()
    assignment = split_persons(names, ratios)
    splits = [assignment[n] for n in names]
    print(split_summary(assignment, names, roles))
    pose_workers = max(1, workers) if len(assignment) >= _MIN_PERSONS_FOR_POSE_POOL else 1
    poses, report = estimate_dataset_poses(
        names, roles, ds.landmarks_2d(), ds.image_sizes(), min_images=4, num_workers=pose_workers
    )
    _check_poses(ds, poses)
    _check_pairs(names, roles, poses, splits, ratios, pairing)
    order = [i for s in SPLITS for i, si in enumerate(splits) if si == s]
    mean_face = np.asarray(report.mean_face, np.float64)
    matrices, errors = _crop_matrices(ds, poses, mean_face, image_size, framing)
    poses = np.asarray(poses, np.float32)
    return _Plan(splits, poses, report.to_dict(), order, ratios, framing, matrices, errors)


def _crop_matrices(
    ds: LegacyDataset, poses: np.ndarray, mean_face: np.ndarray, image_size: int, framing: str
) -> tuple[np.ndarray, dict[int, str]]:
    """[N,2,3] crop transforms and the entries that cannot be framed (index -> reason), decided
    before decoding: a head crop mostly outside its image would train on black borders."""
    out, errors = np.zeros((len(ds.entries), 2, 3)), {}
    for i, e in enumerate(ds.entries):
        w, h = e.image_size
        try:
            if framing == "arcface":
                out[i] = alignment_matrix(e.landmarks_2d, image_size)
                continue
            out[i] = head_crop_matrix(e.landmarks_2d, poses[i], w, h, mean_face, image_size)
        except ValueError as exc:
            errors[i] = f"landmarks_2d: cannot frame the head ({exc})"
            continue
        inside = crop_inside_fraction(out[i], w, h, image_size)
        if inside < MIN_INSIDE_FRACTION:
            errors[i] = (
                f"landmarks_2d: only {inside:.0%} of the head crop lies inside the "
                f"{w}x{h} image (at least {MIN_INSIDE_FRACTION:.0%} needed)"
            )
    return out, errors


def _check_poses(ds: LegacyDataset, poses: np.ndarray) -> None:
    poses = np.asarray(poses)
    if poses.shape != (len(ds.entries), 3):
        raise DataError(f"pose estimation returned shape {list(poses.shape)}, expected [N, 3]")
    bad = np.flatnonzero(~np.isfinite(poses).all(axis=1))
    if len(bad):
        who = sorted({ds.entries[i].person_name for i in bad})
        raise DataError(f"pose estimation gave non-finite poses for {len(bad)} images of {who}")


def _pair_rows(names: list[str], roles: list[str], poses: np.ndarray) -> dict[str, Any]:
    p = np.asarray(poses, np.float64)
    return {"person_name": names, "role": roles, "yaw": p[:, 0], "pitch": p[:, 1], "roll": p[:, 2]}


def _check_pairs(
    names: list[str],
    roles: list[str],
    poses: np.ndarray,
    splits: list[str],
    ratios: Sequence[float],
    pairing: tuple[str, float, float],
) -> dict[str, int]:
    """Warn about persons without video; DataError naming a positive-ratio split with no pairs."""
    mode, lo, hi = pairing
    novid = persons_without_video(names, roles)
    if novid and mode == "front_to_video":
        msg = f"{len(novid)} persons have no video frames (no front_to_video pairs): {novid}"
        logger.warning(msg)
        print(f"warning: {msg}", file=sys.stderr)
    required = required_splits(ratios)
    rows = _pair_rows(names, roles, poses)
    return count_split_pairs(rows, splits, mode, lo, hi, required=required)


def _write_all(
    ds: LegacyDataset,
    plan: _Plan,
    tmp: Path,
    image_size: int,
    num_workers: int,
    skip_bad_images: bool,
    pairing: tuple[str, float, float],
    fingerprint: str,
) -> Manifest:
    """Decode+align in workers, write shards in split order, then verify and write the manifest."""
    writers = {s: _ShardWriter(tmp, s, MAX_ROWS_PER_SHARD) for s in SPLITS}
    tasks = _tasks(ds, plan, image_size)
    bad = [_skipped(ds.entries[i], err) for i, err in sorted(plan.framing_errors.items())]
    kept: list[int] = []
    t0 = time.perf_counter()
    for i, png, err in _run_alignment(tasks, num_workers, len(plan.order)):
        if png is None:
            bad.append(_skipped(ds.entries[i], str(err)))
            continue
        writers[plan.splits[i]].add(_row(ds, i, plan, png))
        kept.append(i)
    elapsed = time.perf_counter() - t0
    print(f"aligned {len(kept)} images in {elapsed:.1f} s ({len(kept) / max(elapsed, 1e-9):.0f}/s)")
    _handle_bad(ds, bad, skip_bad_images)
    for w in writers.values():
        w.flush()
    pair_counts = _recheck_pairs(ds, plan, kept, pairing)
    _write_pair_indexes(tmp, writers, pairing)
    manifest = _manifest(ds, plan, kept, writers, image_size, pair_counts, pairing, fingerprint)
    manifest.skipped = [s.to_dict() for s in ds.skipped + bad]
    manifest.skipped_count = len(manifest.skipped)
    if manifest.skipped_count:
        print(f"skipped {manifest.skipped_count} bad images (recorded in the manifest)")
    _write_json(tmp / MANIFEST, manifest.to_dict())
    return manifest


def _skipped(entry: Any, reason: str) -> SkippedImage:
    return SkippedImage(entry.role, entry.index, entry.person_name, entry.image_path, reason)


def _tasks(ds: LegacyDataset, plan: _Plan, image_size: int) -> list[tuple[list[tuple], int]]:
    items = [
        (i, str(ds.entries[i].resolved_path), plan.matrices[i], ds.entries[i].image_size)
        for i in plan.order
        if i not in plan.framing_errors
    ]
    return [(items[k : k + _CHUNK], image_size) for k in range(0, len(items), _CHUNK)]


def _handle_bad(ds: LegacyDataset, bad: list[SkippedImage], skip: bool) -> None:
    """Corrupt images: an error (before anything is published) unless skipping is allowed."""
    if not bad:
        return
    total = len(ds.source_image_paths)
    message = describe_bad_images(bad, total, ds.image_root_used)
    if not skip:
        raise DataError(f"{message}. Pass --skip_bad_images to skip them.")
    logger.warning("skipping %s", message)


def _recheck_pairs(
    ds: LegacyDataset, plan: _Plan, kept: list[int], pairing: tuple[str, float, float]
) -> dict[str, int]:
    """Pair counts on the rows actually written (skipped images may have removed some)."""
    names = [ds.entries[i].person_name for i in kept]
    roles = [ds.entries[i].role for i in kept]
    splits = [plan.splits[i] for i in kept]
    required = required_splits(plan.ratios)
    rows = _pair_rows(names, roles, plan.poses[kept].reshape(-1, 3))
    mode, lo, hi = pairing
    return count_split_pairs(rows, splits, mode, lo, hi, required=required)


def _write_pair_indexes(
    out: Path, writers: dict[str, _ShardWriter], pairing: tuple[str, float, float]
) -> None:
    """Every split's pair index for the prepared pairing, from the rows just written."""
    for split, writer in writers.items():
        rows = _read_rows(out, writer.files, _META_COLUMNS)
        _write_pair_index(out / pair_index_name(split, *pairing), make_pairs(rows, *pairing))


def _manifest(
    ds: LegacyDataset,
    plan: _Plan,
    kept: list[int],
    writers: dict[str, _ShardWriter],
    image_size: int,
    pair_counts: dict[str, int],
    pairing: tuple[str, float, float],
    fingerprint: str,
) -> Manifest:
    counts: dict[str, dict[str, int]] = {}
    for split in (*SPLITS, "total"):
        rows = [i for i in kept if split == "total" or plan.splits[i] == split]
        roles = [ds.entries[i].role for i in rows]
        counts[split] = {
            "persons": len({ds.entries[i].person_name for i in rows}),
            "images": len(rows),
            "front": roles.count("front"),
            "video": roles.count("video"),
        }
    mode, lo, hi = pairing
    return Manifest(
        schema_version=SCHEMA_VERSION,
        image_size=image_size,
        fingerprint=fingerprint,
        data_dir=str(ds.data_dir),
        image_root=str(ds.image_root_used),
        split_ratios=list(plan.ratios),
        counts=counts,
        shards={s: w.files for s, w in writers.items()},
        pose_report=plan.pose_report,
        pairs={"mode": mode, "min_deg": lo, "max_deg": hi, "per_split": pair_counts},
        persons_without_video=persons_without_video(ds.person_names(), ds.roles()),
        conventions=(geometry.__doc__ or "").strip(),
        alignment=ALIGNMENTS[plan.framing],
        framing=plan.framing,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())


def write_shard_dir(
    out: str | Path,
    rows: Sequence[dict[str, Any]],
    image_size: int,
    pairing: tuple[str, float, float] = ("front_to_video", 5.0, 90.0),
    *,
    fingerprint: str = "rows",
    framing: str = "head",
    max_rows: int = MAX_ROWS_PER_SHARD,
) -> Manifest:
    """Publish crops that already exist (``SHARD_SCHEMA`` rows, each with its ``split``) as a
    shard directory -- Parquet files in split order, pair indexes, manifest -- atomically.

    The same writer and index as :func:`prepare_shards`, without reading a legacy layout:
    for data made elsewhere (synthetic scale benchmarks, tests). Poses are taken as given.
    """
    out = Path(out)
    _refuse_foreign_dir(out)
    ordered = sorted(rows, key=lambda r: SPLITS.index(r["split"]))
    tmp = _temp_dir(out)
    try:
        writers = {s: _ShardWriter(tmp, s, max_rows) for s in SPLITS}
        for r in ordered:
            writers[r["split"]].add(r)
        for w in writers.values():
            w.flush()
        _write_pair_indexes(tmp, writers, pairing)
        manifest = _rows_manifest(ordered, writers, image_size, pairing, fingerprint, framing)
        manifest.pairs["per_split"] = {
            s: len(pq.read_table(tmp / pair_index_name(s, *pairing))) for s in SPLITS
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
    pairing: tuple[str, float, float],
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
    mode, lo, hi = pairing
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


# ------------------------------------------------------------------------------ publishing


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


# ------------------------------------------------------------------------------ pair index


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
    mode: str = "front_to_video",
    min_deg: float = 5.0,
    max_deg: float = 90.0,
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


# ------------------------------------------------------------------------------ cache


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
    if data_cfg.data_dir is None:
        raise ValueError("ensure_shards needs data_cfg.data_dir (a legacy data directory)")
    ds = read_legacy_dataset(
        data_cfg.data_dir, data_cfg.image_dir, skip_bad_images=data_cfg.skip_bad_images, cwd=cwd
    )
    fp = _fingerprint(ds.data_dir, ds.image_root_used, ds.source_image_paths)
    target = shard_cache_dir(data_cfg, fp)
    pairing = (data_cfg.pair_mode, data_cfg.min_pose_distance, data_cfg.max_pose_distance)
    if _reusable(target, fp, data_cfg, pairing):
        print(f"reusing shards at {target}")
        return target
    print(f"preparing shards at {target}")
    workers = (
        num_workers if num_workers is not None else min(data_cfg.num_workers, os.cpu_count() or 1)
    )
    _prepare(
        ds,
        target,
        data_cfg.image_size,
        workers,
        data_cfg.skip_bad_images,
        data_cfg.split_ratios,
        pairing,
        fingerprint=fp,
        framing=data_cfg.framing,
    )
    return target


def _reusable(
    target: Path, fingerprint: str, data_cfg: DataConfig, pairing: tuple[str, float, float]
) -> bool:
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
    mode, lo, hi = pairing
    count_split_pairs(rows, rows["split"], mode, lo, hi, required=required)
    return True
