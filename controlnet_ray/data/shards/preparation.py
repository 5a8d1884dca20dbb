"""Preparation of a legacy layout into a shard directory: split by person, poses, crop framing
and its checks (all decided before any image is decoded), then decode + align, the rows, pair
counts and manifest, published atomically."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from controlnet_ray.config import DataConfig
from controlnet_ray.data import geometry
from controlnet_ray.data.align import (
    FRAMINGS,
    alignment_matrix,
    crop_inside_fraction,
    head_crop_matrix,
)
from controlnet_ray.data.layout import (
    DataError,
    LegacyDataset,
    SkippedImage,
    describe_bad_images,
    describe_unusual,
    read_legacy_dataset,
)
from controlnet_ray.data.pairs import (
    SPLIT_RULE,
    SPLITS,
    count_split_pairs,
    few_persons_warning,
    normalise_ratios,
    persons_without_video,
    required_splits,
    split_persons,
    split_summary,
)
from controlnet_ray.data.pools import pool_workers
from controlnet_ray.data.shards.align_workers import _run_alignment
from controlnet_ray.data.shards.fingerprint import _fingerprint
from controlnet_ray.data.shards.pair_index import PairRule, _write_pair_indexes
from controlnet_ray.data.shards.pose_summary import (
    PoseFrames,
    print_pose_checks,
    print_pose_summary,
    report_poses,
)
from controlnet_ray.data.shards.publish import (
    _publish,
    _refuse_foreign_dir,
    _ShardWriter,
    _temp_dir,
    _write_json,
)
from controlnet_ray.data.shards.schema import (
    ALIGNMENTS,
    MANIFEST,
    MAX_ROWS_PER_SHARD,
    SCHEMA_VERSION,
    Manifest,
)

logger = logging.getLogger(__name__)

_CHUNK = 32  # images per worker task: amortises IPC, keeps the progress bar moving
_MIN_PERSONS_FOR_POSE_POOL = 16  # same for the per-person bundle adjustment
MIN_INSIDE_FRACTION = 0.5  # a crop mostly outside its source image is a data error


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
    frames: PoseFrames  # what the pose report reads


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


def prepare_shards(
    data_cfg: DataConfig,
    out_dir: str | Path,
    num_workers: int | None = None,
    cwd: str | Path | None = None,
) -> Manifest:
    """Read, validate, split, estimate poses, align and publish shards atomically at out_dir:
    ``data_cfg.data_dir`` prepared with ``data_cfg``'s settings (the same DataConfig training
    prepares its cache from, so no setting has a second default here).

    Fails (DataError) before publishing when images are missing/corrupt (unless
    ``skip_bad_images``) or when a split with a positive ratio has no pairs under
    ``pair_mode``/distance range; the manifest records the pair counts. ``num_workers``:
    processes (default :func:`preparation_workers`).
    """
    if data_cfg.data_dir is None:
        raise ValueError("prepare_shards needs data_cfg.data_dir (a legacy data directory)")
    ds = read_legacy_dataset(
        data_cfg.data_dir, data_cfg.image_dir, skip_bad_images=data_cfg.skip_bad_images, cwd=cwd
    )
    return _prepare(
        ds,
        Path(out_dir),
        data_cfg.image_size,
        preparation_workers(data_cfg, num_workers),
        data_cfg.skip_bad_images,
        data_cfg.split_ratios,
        PairRule.of(data_cfg),
        framing=data_cfg.framing,
    )


def preparation_workers(data_cfg: DataConfig, num_workers: int | None = None) -> int:
    """Processes that decode and align: ``num_workers`` when given, else ``--num_workers``;
    either at most the usable CPUs and at least 1 (``pools.pool_workers``, the one policy)."""
    return pool_workers(num_workers if num_workers is not None else data_cfg.num_workers)


def _prepare(
    ds: LegacyDataset,
    out: Path,
    image_size: int,
    num_workers: int,
    skip_bad_images: bool,
    split_ratios: Sequence[float],
    pairing: PairRule,
    fingerprint: str | None = None,
    *,
    framing: str,
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
    print_pose_summary(manifest.pose_report["summary"], out)
    return manifest


def _plan(
    ds: LegacyDataset,
    split_ratios: Sequence[float],
    pairing: PairRule,
    workers: int,
    image_size: int,
    framing: str,
) -> _Plan:
    """Split by person, estimate poses, frame every crop, check every split has pairs."""
    from controlnet_ray.data.pose import PoseFitError, estimate_dataset_poses

    ratios = normalise_ratios(split_ratios)
    names, roles = ds.person_names(), ds.roles()
    assignment = split_persons(names, ratios)
    splits = [assignment[n] for n in names]
    print(split_summary(assignment, names, roles))
    warn_few_persons(Counter(assignment.values()), ratios)
    pose_workers = max(1, workers) if len(assignment) >= _MIN_PERSONS_FOR_POSE_POOL else 1
    try:
        poses, report = estimate_dataset_poses(
            names,
            roles,
            ds.landmarks_2d(),
            ds.image_sizes(),
            min_images=4,
            num_workers=pose_workers,
            labels=[e.image_path for e in ds.entries],
        )
    except PoseFitError as exc:
        raise DataError(f"{ds.data_dir}: pose estimation failed: {exc}") from exc
    print_pose_checks(report)
    _check_poses(ds, poses)
    _check_pairs(names, roles, poses, splits, ratios, pairing)
    order = [i for s in SPLITS for i, si in enumerate(splits) if si == s]
    mean_face = np.asarray(report.mean_face, np.float64)
    matrices, errors = _crop_matrices(ds, poses, mean_face, image_size, framing)
    poses = np.asarray(poses, np.float32)
    frames = PoseFrames(poses, ds.landmarks_2d(), [e.image_path for e in ds.entries], names, splits)
    return _Plan(splits, poses, report.to_dict(), order, ratios, framing, matrices, errors, frames)


def warn_few_persons(persons: Mapping[str, int], ratios: Sequence[float]) -> None:
    """Print :func:`data.pairs.few_persons_warning`'s line, if any, to stderr (a warning, not a
    refusal: see there why)."""
    if warning := few_persons_warning(persons, ratios):
        print(f"warning: {warning}", file=sys.stderr, flush=True)


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
    pairing: PairRule,
) -> dict[str, int]:
    """Warn about persons without video; DataError naming a positive-ratio split with no pairs."""
    mode, lo, hi = pairing.mode, pairing.min_deg, pairing.max_deg
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
    pairing: PairRule,
    fingerprint: str,
) -> Manifest:
    """Decode+align in workers, write shards in split order, then verify and write the manifest."""
    writers = {s: _ShardWriter(tmp, s, MAX_ROWS_PER_SHARD) for s in SPLITS}
    tasks = _tasks(ds, plan, image_size)
    bad = [_skipped(ds.entries[i], err) for i, err in sorted(plan.framing_errors.items())]
    kept: list[int] = []
    sheet, pngs = plan.frames.sheet_candidates(), {}  # the pose contact sheet's crops
    t0 = time.perf_counter()
    for i, png, err in _run_alignment(tasks, num_workers, len(plan.order)):
        if png is None:
            bad.append(_skipped(ds.entries[i], str(err)))
            continue
        writers[plan.splits[i]].add(_row(ds, i, plan, png))
        kept.append(i)
        if i in sheet:
            pngs[plan.frames.files[i]] = png
    elapsed = time.perf_counter() - t0
    print(f"aligned {len(kept)} images in {elapsed:.1f} s ({len(kept) / max(elapsed, 1e-9):.0f}/s)")
    _handle_bad(ds, bad, skip_bad_images)
    for w in writers.values():
        w.flush()
    pair_counts = _recheck_pairs(ds, plan, kept, pairing)
    _write_pair_indexes(tmp, writers, pairing)
    manifest = _manifest(ds, plan, kept, writers, image_size, pair_counts, pairing, fingerprint)
    manifest.pose_report["summary"] = report_poses(tmp, plan.frames.subset(kept), pngs)
    manifest.skipped = [s.to_dict() for s in ds.skipped + bad]
    manifest.skipped_count = len(manifest.skipped)
    if manifest.skipped_count:
        print(f"skipped {manifest.skipped_count} bad images (recorded in the manifest)")
    _record_unusual(manifest, ds, kept)
    _write_json(tmp / MANIFEST, manifest.to_dict())
    return manifest


def _record_unusual(manifest: Manifest, ds: LegacyDataset, kept: list[int]) -> None:
    """The written rows of unusual geometry into the manifest, and one line saying so: the
    run goes on with them (a real head near profile is unusual, not bad)."""
    written = {(ds.entries[i].role, ds.entries[i].index) for i in kept}
    unusual = [u for u in ds.unusual if (u.role, u.index) in written]
    manifest.unusual = [u.to_dict() for u in unusual]
    if unusual:
        print(describe_unusual(unusual, len(kept)))


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
    ds: LegacyDataset, plan: _Plan, kept: list[int], pairing: PairRule
) -> dict[str, int]:
    """Pair counts on the rows actually written (skipped images may have removed some)."""
    names = [ds.entries[i].person_name for i in kept]
    roles = [ds.entries[i].role for i in kept]
    splits = [plan.splits[i] for i in kept]
    required = required_splits(plan.ratios)
    rows = _pair_rows(names, roles, plan.poses[kept].reshape(-1, 3))
    mode, lo, hi = pairing.mode, pairing.min_deg, pairing.max_deg
    return count_split_pairs(rows, splits, mode, lo, hi, required=required)


def _manifest(
    ds: LegacyDataset,
    plan: _Plan,
    kept: list[int],
    writers: dict[str, _ShardWriter],
    image_size: int,
    pair_counts: dict[str, int],
    pairing: PairRule,
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
    mode, lo, hi = pairing.mode, pairing.min_deg, pairing.max_deg
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
        split_rule=SPLIT_RULE,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
