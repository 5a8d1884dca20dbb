"""Writer of the original layout (tests, the synthetic renderer, ``prepare_raw``): the schema
the original script wrote, byte for byte."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from controlnet_ray.data.layout.image_paths import _unsafe_reason
from controlnet_ray.data.layout.records import (
    FRONT_KEYPOINTS,
    FRONT_METADATA,
    VIDEO_KEYPOINTS,
    VIDEO_METADATA,
)
from controlnet_ray.data.legacy import (
    LegacyFit,
    LegacyFitError,
    compute_standard_info,
    legacy_fit,
    legacy_keypoints,
)
from controlnet_ray.files import atomic_write, atomic_write_text


@dataclass(frozen=True)
class ImageRecord:
    """One detected face as the original extraction recorded it (input of the writer)."""

    person_name: str
    image_relpath: str  # relative to repo_root, forward slashes
    image_size: tuple[int, int]  # (w, h)
    box: Sequence[float]  # x1, y1, x2, y2
    landmarks_2d: np.ndarray  # [5,2], InsightFace order
    frame_index: str | None = None  # videos: the frame file's stem (None: derived from the path)


def write_legacy_dataset(
    data_dir: str | Path,
    fronts: Sequence[ImageRecord],
    videos: Sequence[ImageRecord],
    repo_root: str | Path,
    feature_dim: int = 512,
    *,
    video_lm3d_empty: bool = True,
    keypoint_center: str = "image",
) -> Path:
    """Write the four metadata/keypoint files exactly as the original extraction did.

    Legacy poses, ``landmarks_3d_original`` and keypoints are recomputed from each record's 2D
    landmarks with :mod:`controlnet_ray.data.legacy`; ``standard_info`` comes from the fronts
    (see ``legacy.compute_standard_info``: scale = 1 / max radius of the mean front landmarks).
    ``keypoint_center="image"`` centres each image's keypoints on its own landmark mean,
    ``"standard"`` subtracts ``standard_center`` instead. ``video_lm3d_empty`` reproduces the
    original writer's empty ``landmarks_3d_original`` in the video file. Images themselves are
    the caller's job (under ``repo_root / image_relpath``). A relative ``data_dir`` is taken
    relative to ``repo_root``. Returns the data directory.
    """
    if not fronts:
        raise ValueError("write_legacy_dataset needs at least one front image (standard_info)")
    if keypoint_center not in ("image", "standard"):
        raise ValueError(f"keypoint_center must be 'image' or 'standard', got {keypoint_center!r}")
    root = Path(repo_root)
    out = Path(data_dir) if Path(data_dir).is_absolute() else root / data_dir
    out.mkdir(parents=True, exist_ok=True)
    front_fits = [_fit_record(r, "front", i) for i, r in enumerate(fronts)]
    video_fits = [_fit_record(r, "video", i) for i, r in enumerate(videos)]
    centre = "its own landmark mean" if keypoint_center == "image" else "standard_center"
    note = (
        f"keypoints = (landmarks_3d - {centre}) * standard_scale; standard_scale = 1 / max "
        "distance of the mean front landmarks from their centroid"
    )
    info = compute_standard_info(np.stack([f.landmarks_3d for f in front_fits]), note=note)
    center = np.asarray(info["standard_center"]) if keypoint_center == "standard" else None
    scale = info["standard_scale"]
    front_doc = _part_document(fronts, front_fits, "front", feature_dim, True, info)
    video_doc = _part_document(videos, video_fits, "video", feature_dim, not video_lm3d_empty)
    if video_lm3d_empty:
        video_doc["landmarks_3d_original"] = []
    _atomic_write_json(out / FRONT_METADATA, front_doc)
    _atomic_write_json(out / VIDEO_METADATA, video_doc)
    _atomic_save_npy(out / FRONT_KEYPOINTS, _stack_keypoints(front_fits, scale, center))
    _atomic_save_npy(out / VIDEO_KEYPOINTS, _stack_keypoints(video_fits, scale, center))
    return out


def _fit_record(record: ImageRecord, role: str, index: int) -> LegacyFit:
    """Legacy PnP of one record; a failure names the record (the original silently dropped it)."""
    _check_relpath(record.image_relpath, f"{role} record {index}")
    try:
        return legacy_fit(np.asarray(record.landmarks_2d), record.image_size)
    except LegacyFitError as exc:
        raise ValueError(
            f"{role} record {index} ({record.person_name!r}, {record.image_relpath}): {exc}"
        ) from exc


def _check_relpath(relpath: str, what: str) -> None:
    """Refuse paths the reader would refuse, so the writer cannot produce unreadable data."""
    reason = _unsafe_reason(relpath)
    if reason:
        raise ValueError(f"{what}: image_relpath {relpath!r} is not a safe relative path: {reason}")


def _part_document(
    records: Sequence[ImageRecord],
    fits: list[LegacyFit],
    role: str,
    feature_dim: int,
    include_lm3d: bool,
    standard_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One JSON file's content in the original's key order (standard_info: fronts only)."""
    doc: dict[str, Any] = {"num_samples": len(records), "feature_dim": int(feature_dim)}
    if standard_info is not None:
        doc["standard_info"] = standard_info
    doc |= {
        "metadata": [_metadata_entry(r, role) for r in records],
        "poses": [f.euler_deg.tolist() for f in fits],
        "boxes": [np.asarray(r.box, np.float32).reshape(4).tolist() for r in records],
        "landmarks_2d": [
            np.asarray(r.landmarks_2d, np.float32).reshape(5, 2).tolist() for r in records
        ],
    }
    if include_lm3d:
        doc["landmarks_3d_original"] = [f.landmarks_3d.tolist() for f in fits]
    return doc


def _metadata_entry(record: ImageRecord, role: str) -> dict[str, Any]:
    """Backslashed repo-relative path and [w, h], plus the frame file's stem for videos."""
    entry: dict[str, Any] = {
        "person_name": record.person_name,
        "image_path": record.image_relpath.replace("/", "\\"),
        "image_size": [int(record.image_size[0]), int(record.image_size[1])],
    }
    if role == "video":
        stem = Path(record.image_relpath.replace("\\", "/")).stem
        entry["frame_index"] = record.frame_index if record.frame_index is not None else stem
    return entry


def _stack_keypoints(fits: list[LegacyFit], scale: float, center: np.ndarray | None) -> np.ndarray:
    """[N,5,3] float64 like the original's np.save of float64 arrays ([0,5,3] when empty)."""
    if not fits:
        return np.zeros((0, 5, 3), dtype=np.float64)
    lm = np.stack([f.landmarks_3d for f in fits])
    return legacy_keypoints(lm, scale, center)


def _atomic_write_json(path: Path, doc: dict[str, Any]) -> None:
    """UTF-8 JSON with real (non-escaped) non-ASCII names, replaced atomically."""
    atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False))


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` replaced atomically (to a file object: no ``.npy`` appended to the name)."""
    atomic_write(path, lambda f: np.save(f, array))
