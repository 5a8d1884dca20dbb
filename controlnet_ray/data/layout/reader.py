"""Reader of the original layout: :func:`read_legacy_dataset` validates a data directory and
resolves every image path safely (parsing, paths and bad entries live in sibling modules)."""

from __future__ import annotations

import logging
from pathlib import Path

from controlnet_ray.data.layout.bad_images import (
    _handle_missing,
    _impossible_entries,
    unusual_entries,
)
from controlnet_ray.data.layout.image_paths import _build_entries, _choose_root, _safe_relpaths
from controlnet_ray.data.layout.parsing import _read_part
from controlnet_ray.data.layout.records import ROLES, DataError, LegacyDataset

logger = logging.getLogger(__name__)


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
    (symlinks) are always an error. Missing images and landmarks or keypoints no face can have
    (``data.plausibility``) are an error unless ``skip_bad_images``; unusual but possible faces
    are kept and listed in the result's ``unusual``.
    Decodability is checked later, by the shard preparer, before anything is published.
    """
    base = Path(cwd).resolve() if cwd is not None else Path.cwd().resolve()
    ddir = _absolute(data_dir, base)
    if not ddir.is_dir():
        raise DataError(f"data directory not found: {ddir}")
    parts = [_read_part(ddir, role) for role in ROLES]
    all_paths = [p for part in parts for p in part.image_paths]
    rels = _safe_relpaths(parts)
    impossible = _impossible_entries(parts, rels, skip_bad_images)
    idir = _absolute(image_dir, base) if image_dir is not None else None
    if idir is not None and not idir.is_dir():
        raise DataError(f"image directory not found: {idir}")
    root, tried = _choose_root(ddir, idir, base, [r for part in rels for r in part])
    logger.info("image root used: %s", root)
    left_out = {(s.role, s.index) for s in impossible}
    entries, bad = _build_entries(parts, rels, root, left_out)
    skipped = _handle_missing(bad, root, tried, skip_bad_images, len(all_paths))
    return LegacyDataset(
        ddir,
        root,
        entries,
        impossible + skipped,
        parts[0].standard_info,
        all_paths,
        unusual=unusual_entries(entries),
    )


def _absolute(path: str | Path, base: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()
