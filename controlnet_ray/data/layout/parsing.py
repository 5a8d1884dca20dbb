"""Parsing and shape checks of one role's JSON + npy: counts, shapes, finite numbers, sizes
and frame indices, each error naming file, entry, person and field."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from controlnet_ray.data.layout.records import _FILES, DataError, _Part, _where


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
    """[N,5,3] float32 keypoints whose rows must match the metadata one to one; integer or
    float arrays only (bool, complex or text would convert silently, or fail unnamed)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the original layout's {path.name})")
    declared = _npy_dtype(path)
    if declared is not None and declared.kind not in _REAL_KINDS:
        kind = _OTHER_KINDS.get(declared.kind, "not numbers")
        raise DataError(
            f"{path}: keypoints must be real numbers (integer or float), got dtype {declared} "
            f"({kind})"
        )
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


_REAL_KINDS = "iuf"  # signed and unsigned integers, floats
_OTHER_KINDS = {
    "b": "booleans",
    "c": "complex numbers",
    "U": "text",
    "S": "bytes",
    "O": "Python objects",
    "V": "structured records",
    "M": "dates",
    "m": "time spans",
}


def _npy_dtype(path: Path) -> np.dtype | None:
    """The dtype an ``.npy`` header declares, read before the data so that object arrays (which
    never load without pickle) are named too; None when the header is unreadable (np.load then
    says why)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            major, _ = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            return np.dtype(read(f)[2])
    except (ValueError, OSError, EOFError, TypeError):
        return None
