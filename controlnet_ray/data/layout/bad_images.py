"""Bad and unusual entries before any image is decoded: impossible numbers or repeated images
(an error, or skipped), unusual but possible faces (kept, recorded), missing images, and the
one-line descriptions of both used in errors and reports."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from controlnet_ray.data.layout.records import (
    _FILES,
    DataError,
    EntryNote,
    LegacyEntry,
    SkippedImage,
    UnusualEntry,
    _Part,
    _where,
)
from controlnet_ray.data.plausibility import keypoint_problem, landmark_oddity, landmark_problem

logger = logging.getLogger(__name__)

_MAX_LISTED = 5  # how many offending paths an error message lists


def _impossible_entries(
    parts: list[_Part], rels: list[list[str]], skip: bool
) -> list[SkippedImage]:
    """Entries whose numbers cannot describe any face, or that repeat an earlier entry's image.

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
    logger.warning("skipping %d impossible entries; first: %s: %s", len(found), where, first.reason)
    return [s for _, s in found]


def _entry_problem(
    part: _Part, i: int, file: str, npy: str, earlier: str | None
) -> tuple[str, str | None]:
    """(where, why) for entry ``i``; why is None when no rule refuses it."""
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


def unusual_entries(entries: Sequence[LegacyEntry]) -> list[UnusualEntry]:
    """The entries whose landmarks are possible but unusual (see ``landmark_oddity``): they
    stay in the dataset and are only recorded."""
    out = []
    for e in entries:
        oddity = landmark_oddity(e.landmarks_2d)
        if oddity:
            reason = f"field 'landmarks_2d': {oddity}"
            out.append(UnusualEntry(e.role, e.index, e.person_name, e.image_path, reason))
    return out


def describe_unusual(unusual: Sequence[EntryNote], total: int) -> str:
    """'<count> of <total> entries have unusual landmarks (kept ...); first: ...' for reports."""
    return (
        f"{len(unusual)} of {total} entries have unusual landmarks (kept and trained on, "
        f"listed under 'unusual' in the manifest); first: {_listed(unusual, 1)}"
    )


def describe_bad_images(bad: Sequence[EntryNote], total: int, root: Path) -> str:
    """'<count> of <total> images are missing/corrupt under <root>; first: ...' for errors."""
    return (
        f"{len(bad)} of {total} images are missing or unreadable under image root {root}; "
        f"first: {_listed(bad, _MAX_LISTED)}"
    )


def _listed(notes: Sequence[EntryNote], limit: int) -> str:
    """The first ``limit`` entries with path, role, index, person and reason; '... and N more'."""
    listed = "; ".join(
        f"{b.image_path} ({b.role} #{b.index}, person {b.person_name!r}: {b.reason})"
        for b in notes[:limit]
    )
    return listed + (f" and {len(notes) - limit} more" if len(notes) > limit else "")


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
