"""The original research script's on-disk dataset layout: writer, reader and validation.

``DATA_DIR`` holds ``front_metadata.json`` / ``video_metadata.json`` (per-image metadata plus
legacy poses, boxes, 2D landmarks and PnP landmarks) and ``front_keypoints.npy`` /
``video_keypoints.npy`` ([N,5,3] normalised legacy keypoints, rows in metadata order). Image
paths in the JSON are relative to the original repository root and use backslashes
(``train\\datas\\face\\<name>.jpg``), because the original ran on Windows from that root.

Users already have data in this layout, so the reader is strict about consistency (counts,
shapes, finite numbers, images present and inside the image root) and names file, index,
person and field in every error rather than training on zeros. The writer exists so that tests
and the synthetic renderer produce byte-for-byte the schema the original wrote.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from controlnet_ray.data.legacy import (
    LegacyFit,
    LegacyFitError,
    compute_standard_info,
    legacy_fit,
    legacy_keypoints,
)
from controlnet_ray.data.plausibility import keypoint_problem, landmark_problem
from controlnet_ray.files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

FRONT_METADATA = "front_metadata.json"
VIDEO_METADATA = "video_metadata.json"
FRONT_KEYPOINTS = "front_keypoints.npy"
VIDEO_KEYPOINTS = "video_keypoints.npy"
SOURCE_FILES = (FRONT_METADATA, VIDEO_METADATA, FRONT_KEYPOINTS, VIDEO_KEYPOINTS)
ROLES = ("front", "video")
_FILES = {"front": (FRONT_METADATA, FRONT_KEYPOINTS), "video": (VIDEO_METADATA, VIDEO_KEYPOINTS)}
_MAX_LISTED = 5  # how many offending paths an error message lists
_PROBE = 16  # paths sampled to choose the image root


class DataError(ValueError):
    """The dataset on disk is inconsistent; the message names file, index, person and field."""


# --------------------------------------------------------------------------------------- writer


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


# --------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class LegacyEntry:
    """One usable image of the dataset."""

    index: int  # row in its metadata file
    person_name: str
    role: str  # "front" | "video"
    frame_index: int  # trailing digits of the frame stem; -1 for fronts
    image_path: str  # as written in the metadata
    resolved_path: Path  # absolute, inside image_root_used
    image_size: tuple[int, int]  # (w, h)
    box: np.ndarray  # [4] float32
    landmarks_2d: np.ndarray  # [5,2] float32
    keypoints: np.ndarray  # [5,3] float32


@dataclass(frozen=True)
class SkippedImage:
    """An image left out under ``skip_bad_images`` (recorded in the shard manifest)."""

    role: str
    index: int
    person_name: str
    image_path: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "index": self.index,
            "person_name": self.person_name,
            "image_path": self.image_path,
            "reason": self.reason,
        }


@dataclass
class LegacyDataset:
    """Validated content of a legacy data directory."""

    data_dir: Path
    image_root_used: Path
    entries: list[LegacyEntry]
    skipped: list[SkippedImage] = field(default_factory=list)
    standard_info: dict[str, Any] = field(default_factory=dict)
    source_image_paths: list[str] = field(default_factory=list)  # every metadata path

    def __len__(self) -> int:
        return len(self.entries)

    def person_names(self) -> list[str]:
        return [e.person_name for e in self.entries]

    def roles(self) -> list[str]:
        return [e.role for e in self.entries]

    def landmarks_2d(self) -> np.ndarray:
        return np.stack([e.landmarks_2d for e in self.entries]).astype(np.float32)

    def image_sizes(self) -> np.ndarray:
        return np.array([e.image_size for e in self.entries], dtype=np.float32).reshape(-1, 2)


@dataclass
class _Part:
    """One role's parsed and shape-checked arrays (before image resolution)."""

    role: str
    persons: list[str]
    image_paths: list[str]
    frame_indices: list[int]
    sizes: np.ndarray  # [N,2] int
    boxes: np.ndarray  # [N,4]
    landmarks_2d: np.ndarray  # [N,5,2]
    keypoints: np.ndarray  # [N,5,3]
    standard_info: dict[str, Any]


def read_legacy_dataset(
    data_dir: str | Path,
    image_dir: str | Path | None = None,
    skip_bad_images: bool = False,
    cwd: str | Path | None = None,
) -> LegacyDataset:
    """Read and validate a legacy data directory; resolve every image path safely.

    ``image_dir`` is the root the metadata's relative paths hang from. If they do not resolve
    there, the ancestors of ``image_dir`` and then of ``data_dir`` are tried (never above
    ``cwd`` for folders inside it, never above the data's own root, the nearest ancestor holding
    the paths' first folder, e.g. ``train/``), so the original docs' ``--data_dir
    train/datas/file --image_dir train/datas/file`` works from the repo root. The root used is
    logged and returned. Paths that are absolute, contain ``..`` or resolve outside the root
    (symlinks) are always an error. Missing images are an error unless ``skip_bad_images``.
    Decodability is checked later, by the shard preparer, before anything is published.
    """
    base = Path(cwd).resolve() if cwd is not None else Path.cwd().resolve()
    ddir = _absolute(data_dir, base)
    if not ddir.is_dir():
        raise DataError(f"data directory not found: {ddir}")
    parts = [_read_part(ddir, role) for role in ROLES]
    all_paths = [p for part in parts for p in part.image_paths]
    rels = _safe_relpaths(parts)
    implausible = _implausible_entries(parts, rels, skip_bad_images)
    idir = _absolute(image_dir, base) if image_dir is not None else None
    if idir is not None and not idir.is_dir():
        raise DataError(f"image directory not found: {idir}")
    root, tried = _choose_root(ddir, idir, base, [r for part in rels for r in part])
    logger.info("image root used: %s", root)
    left_out = {(s.role, s.index) for s in implausible}
    entries, bad = _build_entries(parts, rels, root, left_out)
    skipped = _handle_missing(bad, root, tried, skip_bad_images, len(all_paths))
    return LegacyDataset(
        ddir, root, entries, implausible + skipped, parts[0].standard_info, all_paths
    )


def _absolute(path: str | Path, base: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


# ---- parsing and shape checks


def _read_part(ddir: Path, role: str) -> _Part:
    """Parse one role's JSON + npy and check counts, shapes and finiteness."""
    json_name, npy_name = _FILES[role]
    doc = _load_json(ddir / json_name)
    meta = _require_list(doc, "metadata", json_name)
    n = len(meta)
    if "num_samples" in doc and doc["num_samples"] != n:
        raise DataError(
            f"{json_name}: num_samples is {doc['num_samples']} but 'metadata' has {n} entries"
        )
    persons, paths, sizes, frames = _parse_metadata(meta, json_name, role)
    arrays = {}
    for key, tail in (("poses", (3,)), ("boxes", (4,)), ("landmarks_2d", (5, 2))):
        values = _require_list(doc, key, json_name)
        _check_count(json_name, key, len(values), n)
        arrays[key] = _numeric(json_name, key, values, tail, persons)
    _check_lm3d(doc, json_name, n, persons)
    keypoints = _load_keypoints(ddir / npy_name, json_name, n, persons)
    info = doc.get("standard_info", {}) if role == "front" else {}
    if role == "front" and not isinstance(info, dict):
        raise DataError(f"{json_name}: field 'standard_info' must be an object")
    return _Part(
        role,
        persons,
        paths,
        frames,
        sizes,
        arrays["boxes"],
        arrays["landmarks_2d"],
        keypoints,
        info,
    )


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the original layout's {path.name})")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(doc).__name__}")
    return doc


def _require_list(doc: dict[str, Any], key: str, file: str) -> list:
    if key not in doc:
        raise DataError(f"{file}: missing field {key!r}")
    if not isinstance(doc[key], list):
        raise DataError(f"{file}: field {key!r} must be a list, got {type(doc[key]).__name__}")
    return doc[key]


def _check_count(file: str, key: str, got: int, n: int) -> None:
    if got != n:
        raise DataError(f"{file}: field {key!r} has {got} rows but 'metadata' has {n} entries")


def _where(file: str, index: int, persons: Sequence[str]) -> str:
    person = persons[index] if index < len(persons) else "?"
    return f"{file}: entry {index} (person {person!r})"


def _parse_metadata(
    meta: list, file: str, role: str
) -> tuple[list[str], list[str], np.ndarray, list[int]]:
    """person_name, image_path, image_size and (videos) frame_index of every entry."""
    persons: list[str] = []
    paths: list[str] = []
    sizes = np.zeros((len(meta), 2), dtype=np.int64)
    frames: list[int] = []
    for i, entry in enumerate(meta):
        if not isinstance(entry, dict):
            raise DataError(f"{file}: entry {i}: metadata entry must be an object")
        name, path = entry.get("person_name"), entry.get("image_path")
        if not isinstance(name, str) or not name:
            raise DataError(f"{file}: entry {i}: field 'person_name' must be a non-empty string")
        persons.append(name)
        if not isinstance(path, str) or not path:
            raise DataError(f"{_where(file, i, persons)}: field 'image_path' must be a string")
        paths.append(path)
        sizes[i] = _parse_size(entry.get("image_size"), _where(file, i, persons))
        frames.append(_parse_frame(entry, path, role, _where(file, i, persons)))
    return persons, paths, sizes, frames


def _parse_size(value: Any, where: str) -> tuple[int, int]:
    ok = isinstance(value, list | tuple) and len(value) == 2
    if ok and all(isinstance(v, int | float) and np.isfinite(v) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise DataError(f"{where}: field 'image_size' must be [width, height] > 0, got {value!r}")


_TRAILING_DIGITS = re.compile(r"(\d+)$")


def _parse_frame(entry: dict[str, Any], path: str, role: str, where: str) -> int:
    """Frame number from the stem's trailing digits ('<name>frame_000230' -> 230); -1 for fronts.

    The original wrote the stem as a string; ints are accepted too. Without the field the
    image file's stem is used.
    """
    if role == "front":
        return -1
    value = entry.get("frame_index", Path(path.replace("\\", "/")).stem)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    match = _TRAILING_DIGITS.search(value) if isinstance(value, str) else None
    if match is None:
        raise DataError(f"{where}: field 'frame_index' {value!r} has no trailing frame number")
    return int(match.group(1))


def _numeric(
    file: str, key: str, values: list, tail: tuple[int, ...], persons: Sequence[str]
) -> np.ndarray:
    """[N, *tail] float64 from nested lists, naming the first malformed or non-finite entry."""
    n = len(values)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n, *tail):
        _raise_first_bad_shape(file, key, values, tail, persons)
    _check_finite(file, key, arr, persons)
    return arr


def _raise_first_bad_shape(
    file: str, key: str, values: list, tail: tuple[int, ...], persons: Sequence[str]
) -> None:
    for i, v in enumerate(values):
        try:
            shape = np.asarray(v, dtype=np.float64).shape
        except (TypeError, ValueError):
            shape = None
        if shape != tail:
            raise DataError(
                f"{_where(file, i, persons)}: field {key!r} must have shape {list(tail)}, "
                f"got {v!r:.80}"
            )
    raise DataError(f"{file}: field {key!r} must have shape [N, {', '.join(map(str, tail))}]")


def _check_finite(file: str, key: str, arr: np.ndarray, persons: Sequence[str]) -> None:
    bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{_where(file, i, persons)}: field {key!r} has non-finite values "
            f"{arr[i].tolist()} ({len(bad)} such rows)"
        )


def _check_lm3d(doc: dict[str, Any], file: str, n: int, persons: Sequence[str]) -> None:
    """landmarks_3d_original is unused but must be empty (the original's video bug) or [N,5,3]."""
    values = doc.get("landmarks_3d_original", [])
    if not isinstance(values, list):
        raise DataError(f"{file}: field 'landmarks_3d_original' must be a list")
    if values:
        _check_count(file, "landmarks_3d_original", len(values), n)
        _numeric(file, "landmarks_3d_original", values, (5, 3), persons)


def _load_keypoints(path: Path, json_name: str, n: int, persons: Sequence[str]) -> np.ndarray:
    """[N,5,3] float32 keypoints whose rows must match the metadata one to one."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the original layout's {path.name})")
    try:
        kp = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array: {exc}") from exc
    if n == 0 and kp.size == 0:
        return np.zeros((0, 5, 3), dtype=np.float32)
    if kp.ndim == 0 or kp.shape[0] != n:
        rows = kp.shape[0] if kp.ndim else 0
        raise DataError(
            f"{path.name}: {rows} keypoint rows but {json_name} has {n} metadata entries"
        )
    if kp.shape[1:] != (5, 3):
        raise DataError(f"{path.name}: keypoints must have shape [N, 5, 3], got {list(kp.shape)}")
    kp = kp.astype(np.float64)
    _check_finite(path.name, "keypoints", kp, persons)
    return kp.astype(np.float32)


# ---- image paths


def _unsafe_reason(raw: str) -> str | None:
    """Why a metadata path may not be used as a relative path under the root (None: fine)."""
    posix = raw.replace("\\", "/")
    if PureWindowsPath(raw).drive or posix.startswith("/"):
        return "absolute path"
    if ".." in posix.split("/"):
        return "'..' component"
    return None


def _normalise(raw: str) -> str:
    return "/".join(p for p in raw.replace("\\", "/").split("/") if p not in ("", "."))


def _safe_relpaths(parts: list[_Part]) -> list[list[str]]:
    """Forward-slash relative paths; absolute or '..' paths are refused, naming the entry."""
    out = []
    for part in parts:
        file = _FILES[part.role][0]
        rels = []
        for i, raw in enumerate(part.image_paths):
            reason = _unsafe_reason(raw)
            if reason:
                raise DataError(
                    f"{_where(file, i, part.persons)}: field 'image_path' {raw!r} escapes the "
                    f"image root ({reason})"
                )
            rels.append(_normalise(raw))
        out.append(rels)
    return out


def _walk_up(start: Path, limit: Path | None) -> list[Path]:
    """start and its ancestors up to limit (inclusive); only start when limit is not above it."""
    if limit is None or not start.is_relative_to(limit):
        return [start]
    out = [start]
    for parent in start.parents:
        if not parent.is_relative_to(limit):
            break
        out.append(parent)
    return out


def _data_root(start: Path, first: str) -> Path | None:
    """Nearest ancestor (or self) holding the paths' first folder, e.g. the repo with train/."""
    for candidate in (start, *start.parents):
        if first and (candidate / first).is_dir():
            return candidate
    return None


def _candidate_roots(ddir: Path, idir: Path | None, cwd: Path, first: str) -> list[Path]:
    """image_dir and its ancestors, then data_dir and its ancestors, bounded as documented."""
    out: list[Path] = []
    for start in [p for p in (idir, ddir) if p is not None]:
        limit = cwd if start.is_relative_to(cwd) else _data_root(start, first)
        for c in _walk_up(start, limit):
            if c not in out:
                out.append(c)
    return out


def _choose_root(
    ddir: Path, idir: Path | None, cwd: Path, rels: list[str]
) -> tuple[Path, list[Path]]:
    """First candidate under which a sample of the paths all exist (else the best one)."""
    first = rels[0].split("/")[0] if rels and "/" in rels[0] else ""
    candidates = _candidate_roots(ddir, idir, cwd, first)
    if not rels:
        return candidates[0], candidates
    step = max(1, len(rels) // _PROBE)
    sample = rels[::step][:_PROBE]
    best, best_hits = candidates[0], -1
    for cand in candidates:
        hits = sum((cand / r).is_file() for r in sample)
        if hits == len(sample):
            return cand, candidates
        if hits > best_hits:
            best, best_hits = cand, hits
    return best, candidates


def _build_entries(
    parts: list[_Part], rels: list[list[str]], root: Path, left_out: set[tuple[str, int]]
) -> tuple[list[LegacyEntry], list[SkippedImage]]:
    """Resolve each path under root; symlinks out of the root are refused, missing files noted.

    ``left_out``: (role, index) of entries already skipped as implausible."""
    entries, missing = [], []
    for part, part_rels in zip(parts, rels, strict=True):
        file = _FILES[part.role][0]
        for i, rel in enumerate(part_rels):
            if (part.role, i) in left_out:
                continue
            resolved = (root / rel).resolve()
            if not resolved.is_relative_to(root):
                raise DataError(
                    f"{_where(file, i, part.persons)}: field 'image_path' "
                    f"{part.image_paths[i]!r} resolves to {resolved}, outside the image root "
                    f"{root} (symlink?)"
                )
            if not resolved.is_file():
                missing.append(
                    SkippedImage(part.role, i, part.persons[i], part.image_paths[i], "missing")
                )
                continue
            entries.append(_entry(part, i, resolved))
    return entries, missing


def _entry(part: _Part, i: int, resolved: Path) -> LegacyEntry:
    return LegacyEntry(
        index=i,
        person_name=part.persons[i],
        role=part.role,
        frame_index=part.frame_indices[i],
        image_path=part.image_paths[i],
        resolved_path=resolved,
        image_size=(int(part.sizes[i, 0]), int(part.sizes[i, 1])),
        box=part.boxes[i].astype(np.float32),
        landmarks_2d=part.landmarks_2d[i].astype(np.float32),
        keypoints=part.keypoints[i],
    )


# ---- plausibility (before any image is decoded)


def _implausible_entries(
    parts: list[_Part], rels: list[list[str]], skip: bool
) -> list[SkippedImage]:
    """Entries whose numbers cannot describe a face, or that repeat an earlier entry's image.

    An error naming file, entry, person and field, unless ``skip`` (then skipped, recorded).
    A person with several different front photos is fine; the same image listed twice would
    count its pairs twice, so the repeat is refused.
    """
    found: list[tuple[str, SkippedImage]] = []
    seen: dict[str, str] = {}
    for part, part_rels in zip(parts, rels, strict=True):
        file, npy = _FILES[part.role]
        for i, rel in enumerate(part_rels):
            where, reason = _entry_problem(part, i, file, npy, seen.get(rel))
            seen.setdefault(rel, f"{file} entry {i}")
            if reason:
                found.append(
                    (
                        where,
                        SkippedImage(part.role, i, part.persons[i], part.image_paths[i], reason),
                    )
                )
    if not found:
        return []
    where, first = found[0]
    if not skip:
        more = f" ({len(found)} such entries)" if len(found) > 1 else ""
        raise DataError(
            f"{where}: {first.reason}{more}. Fix the data, or pass --skip_bad_images to skip "
            "such entries (they are recorded in the manifest)."
        )
    logger.warning(
        "skipping %d implausible entries; first: %s: %s", len(found), where, first.reason
    )
    return [s for _, s in found]


def _entry_problem(
    part: _Part, i: int, file: str, npy: str, earlier: str | None
) -> tuple[str, str | None]:
    """(where, why) for entry ``i``; why is None when the entry is plausible."""
    size = (int(part.sizes[i, 0]), int(part.sizes[i, 1]))
    problem = landmark_problem(part.landmarks_2d[i], size)
    if problem:
        return _where(file, i, part.persons), f"field 'landmarks_2d': {problem}"
    problem = keypoint_problem(part.keypoints[i])
    if problem:
        return _where(npy, i, part.persons), f"field 'keypoints': {problem}"
    if earlier is not None:
        return (
            _where(file, i, part.persons),
            f"field 'image_path' {part.image_paths[i]!r} repeats {earlier}",
        )
    return "", None


def describe_bad_images(bad: Sequence[SkippedImage], total: int, root: Path) -> str:
    """'<count> of <total> images are missing/corrupt under <root>; first: ...' for errors."""
    listed = "; ".join(
        f"{b.image_path} ({b.role} #{b.index}, person {b.person_name!r}: {b.reason})"
        for b in bad[:_MAX_LISTED]
    )
    more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return (
        f"{len(bad)} of {total} images are missing or unreadable under image root {root}; "
        f"first: {listed}{more}"
    )


def _handle_missing(
    bad: list[SkippedImage], root: Path, tried: list[Path], skip: bool, total: int
) -> list[SkippedImage]:
    if not bad:
        return []
    message = describe_bad_images(bad, total, root)
    if not skip:
        roots = ", ".join(str(t) for t in tried)
        raise DataError(
            f"{message}. Roots tried: {roots}. Pass --image_dir, or --skip_bad_images to skip."
        )
    logger.warning("skipping %s", message)
    return bad
