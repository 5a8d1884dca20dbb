"""Person-level train/val/test split and (source, target) pairing by head-pose distance.

Split: every person goes to exactly one split, so no identity leaks between train and
evaluation. The bucket comes from the person's name alone: the first 8 bytes of
``sha256(name.encode("utf-8"))`` read as an unsigned integer / 2**64 give ``u`` in [0, 1),
and ``u`` is bucketed by the cumulative normalised ratios (train first, then val, then test).
That is identical on every machine and process (no PYTHONHASHSEED, no RNG state), and adding
persons never moves existing ones -- except by the small-data rule below.

Small data: a held-out figure from one or two persons is that person's figure (identity
chance 100 % with one), so every split with a positive ratio gets at least
``MIN_SPLIT_PERSONS`` (3) persons whenever the data has that many per such split (9 for the
default three splits). A split that comes out short is topped up one person at a time from
the split that has the most persons (the train split, unless the ratios say otherwise), moving
the person whose ``u`` is nearest to the short split's interval (names break ties); everything
else follows the ratios. With fewer persons than that, but at least 3, every such split still
gets at least one person the same way. The result depends only on the set of names.
``SPLIT_RULE`` numbers this rule; it is part of the shard cache key and of the manifest, so
shards split by an earlier rule are never reused as if split by this one.

Pairs: the pose distance of two images is the Euclidean norm of their (yaw, pitch, roll)
difference in degrees, each component wrapped to [-180, 180). ``front_to_video`` is the
original's rule: a person's front photo as source, one of the same person's video frames as
target, ``min_deg <= distance <= max_deg``. ``any`` takes every ordered pair of two distinct
images of a person within the same range (both directions, so the model learns both ways).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from controlnet_ray.config import PAIR_MODES, DataConfig
from controlnet_ray.data.layout import DataError

SPLITS = ("train", "val", "test")
DEFAULT_RATIOS = (0.7, 0.15, 0.15)
MIN_SPLIT_PERSONS = 3  # persons every positive-ratio split gets when the data allows
SPLIT_RULE = 2  # 1: at least one person per split; 2: at least MIN_SPLIT_PERSONS


def normalise_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Three non-negative numbers scaled to sum 1 (ValueError otherwise)."""
    r = tuple(float(x) for x in ratios)
    if len(r) != 3 or any(not np.isfinite(x) or x < 0 for x in r) or sum(r) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers, got {list(ratios)}")
    total = sum(r)
    return (r[0] / total, r[1] / total, r[2] / total)


def required_splits(ratios: Sequence[float]) -> list[str]:
    """Splits with a positive ratio: these must end up with pairs."""
    return [s for s, r in zip(SPLITS, normalise_ratios(ratios), strict=True) if r > 0]


def person_unit(name: str) -> float:
    """Deterministic u in [0, 1) from the UTF-8 name (sha256, first 8 bytes / 2**64)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _intervals(ratios: tuple[float, float, float]) -> dict[str, tuple[float, float]]:
    edges = np.concatenate([[0.0], np.cumsum(ratios)])
    edges[-1] = 1.0  # guard against rounding
    return {s: (float(edges[i]), float(edges[i + 1])) for i, s in enumerate(SPLITS)}


def _bucket(u: float, intervals: dict[str, tuple[float, float]]) -> str:
    for split in SPLITS:
        lo, hi = intervals[split]
        if lo <= u < hi:
            return split
    return SPLITS[-1]


def split_persons(names: Iterable[str], ratios: Sequence[float] = DEFAULT_RATIOS) -> dict[str, str]:
    """person name -> "train" | "val" | "test" (see the module docstring for the rule)."""
    norm = normalise_ratios(ratios)
    intervals = _intervals(norm)
    units = {n: person_unit(n) for n in sorted(set(names))}
    assignment = {n: _bucket(u, intervals) for n, u in units.items()}
    positive = [s for s, r in zip(SPLITS, norm, strict=True) if r > 0]
    if len(units) >= MIN_SPLIT_PERSONS * len(positive):
        _top_up(assignment, units, positive, intervals, MIN_SPLIT_PERSONS)
    elif len(units) >= 3:
        _top_up(assignment, units, positive, intervals, 1)
    return assignment


def _top_up(
    assignment: dict[str, str],
    units: dict[str, float],
    positive: Sequence[str],
    intervals: dict[str, tuple[float, float]],
    minimum: int,
) -> None:
    """Move persons into each positive split below ``minimum`` (val first, then test, then
    train), one at a time from the largest split, the person nearest to its interval first.
    The caller guarantees enough persons, so the largest split always has more than
    ``minimum``."""
    for split in sorted(positive, key=("val", "test", "train").index):
        while (sizes := Counter(assignment.values()))[split] < minimum:
            donor = max(SPLITS, key=lambda s: (sizes[s], -SPLITS.index(s)))
            lo, hi = intervals[split]
            members = [n for n, s in assignment.items() if s == donor]
            person = min(members, key=lambda n: (max(lo - units[n], units[n] - hi, 0.0), n))
            assignment[person] = split


def few_persons_warning(persons: Mapping[str, int], ratios: Sequence[float]) -> str | None:
    """One line when a held-out split (val, test) with a positive ratio has fewer than
    ``MIN_SPLIT_PERSONS`` persons (``persons``: split -> persons in it), saying what to do;
    None otherwise.

    A warning, not a refusal: training itself is sound on any number of persons -- only the
    held-out figures lose their meaning (one person's identity top-1 is always 100 %) -- and
    small sets are what smoke tests, the tests' tiny embedded datasets and a first try on a
    handful of persons are. So the run goes on, says so where it splits the data, and
    ``evaluate`` repeats it in its headline.
    """
    norm = normalise_ratios(ratios)
    held = [s for s in ("val", "test") if norm[SPLITS.index(s)] > 0]
    short = [s for s in held if persons.get(s, 0) < MIN_SPLIT_PERSONS]
    if not short:
        return None
    total = sum(persons.get(s, 0) for s in SPLITS)
    need = MIN_SPLIT_PERSONS * len(required_splits(norm))
    counts = " and ".join(f"{s} {persons.get(s, 0)}" for s in short)
    fix = f"use at least {need} persons ({MIN_SPLIT_PERSONS} per split)"
    if len(held) == 2 and total >= 2 * MIN_SPLIT_PERSONS:
        fix += f" or one held-out split (--split_ratios {norm[0]:.2g} {norm[1] + norm[2]:.2g} 0)"
    return (
        f"few held-out persons ({counts} of {total}): the held-out figures are those of "
        f"fewer than {MIN_SPLIT_PERSONS} persons; {fix}"
    )


def split_summary(
    assignment: Mapping[str, str],
    person_names: Sequence[str],
    roles: Sequence[str] | None = None,
) -> str:
    """Human-readable persons/images (front/video) per split, one line each."""
    lines = []
    for split in SPLITS:
        persons = sum(1 for s in assignment.values() if s == split)
        rows = [i for i, n in enumerate(person_names) if assignment.get(n) == split]
        line = f"  {split:<5}: {persons} persons, {len(rows)} images"
        if roles is not None:
            fronts = sum(1 for i in rows if roles[i] == "front")
            line += f" ({fronts} front, {len(rows) - fronts} video)"
        lines.append(line)
    return "split by person:\n" + "\n".join(lines)


# ----------------------------------------------------------------------------------- pairing


def _column(rows: Any, names: Sequence[str]) -> np.ndarray:
    """One column of a pandas DataFrame, pyarrow Table or dict of columns, by first known name."""
    for name in names:
        if hasattr(rows, "column_names") and name in rows.column_names:  # pyarrow.Table
            return np.asarray(rows.column(name).to_pylist(), dtype=object)
        if hasattr(rows, "columns") and name in rows.columns:  # pandas.DataFrame
            return np.asarray(rows[name].to_numpy(), dtype=object)
        if isinstance(rows, Mapping) and name in rows:
            return np.asarray(list(rows[name]), dtype=object)
    raise KeyError(f"rows have no column named any of {list(names)}")


def _as_columns(rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(persons, roles, ypr [N,3] float64) from a table or a sequence of records."""
    tabular = hasattr(rows, "column_names") or hasattr(rows, "columns") or isinstance(rows, Mapping)
    if not tabular:
        records = list(rows)
        if records and isinstance(records[0], Mapping):
            keys = ("person_name", "role", "yaw", "pitch", "roll")
            if "person_name" not in records[0]:
                keys = ("person", *keys[1:])
            records = [tuple(r[k] for k in keys) for r in records]
        rows = {
            k: [r[i] for r in records]
            for i, k in enumerate(("person_name", "role", "yaw", "pitch", "roll"))
        }
    persons = _column(rows, ("person_name", "person"))
    roles = _column(rows, ("role",))
    ypr = np.stack([_column(rows, (k,)).astype(np.float64) for k in ("yaw", "pitch", "roll")], 1)
    return persons, roles, ypr.reshape(-1, 3)


def _groups(persons: np.ndarray) -> list[np.ndarray]:
    """Row indices per person, persons in order of first appearance."""
    order: dict[Any, list[int]] = {}
    for i, p in enumerate(persons):
        order.setdefault(p, []).append(i)
    return [np.asarray(v, dtype=np.int64) for v in order.values()]


def pose_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise distance [len(a), len(b)] in degrees between (yaw, pitch, roll) rows."""
    diff = a[:, None, :] - b[None, :, :]
    diff = (diff + 180.0) % 360.0 - 180.0
    return np.linalg.norm(diff, axis=-1)


def _person_pairs(
    idx: np.ndarray, roles: np.ndarray, ypr: np.ndarray, mode: str, lo: float, hi: float
) -> np.ndarray:
    if mode == "front_to_video":
        src = idx[roles[idx] == "front"]
        tgt = idx[roles[idx] == "video"]
    else:
        src = tgt = idx
    if len(src) == 0 or len(tgt) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    dist = pose_distance(ypr[src], ypr[tgt])
    ok = (dist >= lo) & (dist <= hi)
    if mode == "any":
        np.fill_diagonal(ok, False)
    i, j = np.nonzero(ok)
    return np.stack([src[i], tgt[j]], axis=1)


def make_pairs(
    rows: Any,
    mode: str = DataConfig.pair_mode,
    min_deg: float = DataConfig.min_pose_distance,
    max_deg: float = DataConfig.max_pose_distance,
) -> np.ndarray:
    """[P,2] int64 (source row, target row) indices into ``rows`` (see module docstring).

    ``rows`` is a pandas DataFrame, a pyarrow Table, a dict of columns or a sequence of
    records/tuples with person_name (or person), role, yaw, pitch, roll. Ordered by person
    (first appearance), then source, then target. Pure: reporting is the caller's job.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"pair mode must be one of {PAIR_MODES}, got {mode!r}")
    if not 0 <= min_deg <= max_deg:
        raise ValueError(f"need 0 <= min_deg <= max_deg, got {min_deg}, {max_deg}")
    persons, roles, ypr = _as_columns(rows)
    if len(persons) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    roles = roles.astype(str)
    parts = [_person_pairs(g, roles, ypr, mode, min_deg, max_deg) for g in _groups(persons)]
    return np.concatenate(parts).astype(np.int64)


def persons_without_video(person_names: Sequence[str], roles: Sequence[str]) -> list[str]:
    """Persons with front photos but no video frame (they yield no front_to_video pairs)."""
    has_video = {p for p, r in zip(person_names, roles, strict=True) if r == "video"}
    return sorted({p for p in person_names if p not in has_video})


def count_split_pairs(
    rows: Any,
    splits: Sequence[str],
    mode: str = DataConfig.pair_mode,
    min_deg: float = DataConfig.min_pose_distance,
    max_deg: float = DataConfig.max_pose_distance,
    required: Iterable[str] = SPLITS,
) -> dict[str, int]:
    """Pairs per split; DataError naming the first ``required`` split that has none.

    ``splits[i]`` is row i's split. Splits not in ``required`` (e.g. a 0-ratio split) may be
    empty.
    """
    persons, roles, ypr = _as_columns(rows)
    split_arr = np.asarray(list(splits), dtype=object)
    counts = {}
    for split in SPLITS:
        sel = np.flatnonzero(split_arr == split)
        sub = {"person_name": persons[sel], "role": roles[sel]}
        sub |= {k: ypr[sel, i] for i, k in enumerate(("yaw", "pitch", "roll"))}
        counts[split] = int(len(make_pairs(sub, mode, min_deg, max_deg)))
    for split in required:
        if counts.get(split, 0) == 0:
            sel = np.flatnonzero(split_arr == split)
            raise DataError(
                _no_pairs_message(split, persons[sel], roles[sel], mode, (min_deg, max_deg))
            )
    return counts


def _no_pairs_message(
    split: str, persons: np.ndarray, roles: np.ndarray, mode: str, rng: tuple[float, float]
) -> str:
    n_persons = len(set(persons.tolist()))
    msg = (
        f"split {split!r} has no {mode} pairs ({n_persons} persons, {len(persons)} images, "
        f"pose distance {rng[0]:g}..{rng[1]:g} deg)"
    )
    if mode == "front_to_video":
        novid = persons_without_video(persons.tolist(), roles.astype(str).tolist())
        if novid:
            msg += f"; persons without video frames: {novid[:10]}"
    return msg + ". Check --split_ratios, --pair_mode and --min/--max_pose_distance."
