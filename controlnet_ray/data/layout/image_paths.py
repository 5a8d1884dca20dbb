"""Image paths of the metadata: refused when unsafe (absolute, ``..``, outside the root), the
image root chosen among candidates, and each path resolved to an entry."""

from __future__ import annotations

from pathlib import Path, PureWindowsPath

import numpy as np

from controlnet_ray.data.layout.records import (
    _FILES,
    DataError,
    LegacyEntry,
    SkippedImage,
    _Part,
    _where,
)

_PROBE = 16  # paths sampled to choose the image root


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

    ``left_out``: (role, index) of entries already skipped as impossible."""
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
