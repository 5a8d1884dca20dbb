"""Bad entries before any image is decoded: implausible numbers or repeated images, missing
images, and the one-line description of bad images used in errors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from controlnet_ray.data.layout.records import _FILES, DataError, SkippedImage, _Part, _where
from controlnet_ray.data.plausibility import keypoint_problem, landmark_problem

logger = logging.getLogger(__name__)

_MAX_LISTED = 5  # how many offending paths an error message lists


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
