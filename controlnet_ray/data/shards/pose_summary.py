"""The pose report printed after preparation and kept in the manifest (``pose_report``'s
``summary``): yaw/pitch/roll ranges per split, the frames a user should look at (poses beyond
what the model is made for, yaws the nose's side contradicts) named by file, and a contact
sheet of the extreme and outlying crops beside the shards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from controlnet_ray.data.decode import decode_rgb
from controlnet_ray.data.geometry import POSE_LIMITS_DEG
from controlnet_ray.data.pose.evidence import yaw_contradicts
from controlnet_ray.data.preview import join, tile

AXES = ("yaw", "pitch", "roll")
#: Beyond these a pose is an outlier: yaw beyond the model's range; pitch and roll beyond what
#: a talking head shows (real video rarely passes +-45; a fit that does is usually wrong).
OUTLIER_LIMITS_DEG = {"yaw": POSE_LIMITS_DEG["yaw"], "pitch": 45.0, "roll": 45.0}
SHEET_NAME = "pose_extremes.png"
MAX_LISTED = 50  # outliers kept in the manifest (the worst first); the count is exact
SHEET_OUTLIERS = 8  # outlier crops on the contact sheet


@dataclass
class PoseFrames:
    """The prepared frames' poses [N,3], source landmarks [N,5,2], files, persons and splits."""

    poses: np.ndarray
    landmarks: np.ndarray
    files: Sequence[str]
    persons: Sequence[str]
    splits: Sequence[str]

    def subset(self, index: Sequence[int]) -> PoseFrames:
        idx = list(index)
        pick = [self.files, self.persons, self.splits]
        files, persons, splits = ([seq[i] for i in idx] for seq in pick)
        return PoseFrames(self.poses[idx], self.landmarks[idx], files, persons, splits)

    def sheet_candidates(self) -> set[int]:
        """Frames whose crops the contact sheet may need (decided before decoding, so only
        these crops are kept): each axis' two lowest and highest, and the worst outliers."""
        order = np.argsort(np.asarray(self.poses), axis=0)
        ends = {int(i) for i in np.concatenate([order[:2], order[-2:]]).ravel()}
        return ends | set(outlier_indices(self)[:SHEET_OUTLIERS])


def _reasons(frames: PoseFrames) -> list[list[str]]:
    """Why each frame is an outlier (empty: it is not)."""
    p = np.asarray(frames.poses, np.float64)
    out: list[list[str]] = [[] for _ in range(len(p))]
    for k, axis in enumerate(AXES):
        for i in np.flatnonzero(np.abs(p[:, k]) > OUTLIER_LIMITS_DEG[axis]):
            out[i].append(f"|{axis}| > {OUTLIER_LIMITS_DEG[axis]:g}")
    for i in np.flatnonzero(yaw_contradicts(p[:, 0], frames.landmarks)):
        out[i].append("yaw opposite to the nose's side")
    return out


def _severity(pose: np.ndarray) -> float:
    return float(max(abs(pose[k]) / OUTLIER_LIMITS_DEG[a] for k, a in enumerate(AXES)))


def outlier_indices(frames: PoseFrames) -> list[int]:
    """Outlying frames, the most extreme pose first."""
    bad = [i for i, why in enumerate(_reasons(frames)) if why]
    return sorted(bad, key=lambda i: -_severity(frames.poses[i]))


def extremes(poses: np.ndarray) -> dict[int, str]:
    """The frames of lowest and highest yaw, pitch and roll -> which they are."""
    p, out = np.asarray(poses), {}
    for k, axis in enumerate(AXES):
        for end, pick in (("lowest", np.argmin), ("highest", np.argmax)):
            i = int(pick(p[:, k]))
            out[i] = f"{out[i]}, {end} {axis}" if i in out else f"{end} {axis}"
    return out


def _entry(frames: PoseFrames, i: int, what: str) -> dict[str, Any]:
    pose = [round(float(v), 1) for v in frames.poses[i]]
    return {"file": frames.files[i], "person": frames.persons[i], "split": frames.splits[i]} | {
        "yaw": pose[0],
        "pitch": pose[1],
        "roll": pose[2],
        "why": what,
    }


def summarise_poses(frames: PoseFrames) -> dict[str, Any]:
    """The JSON summary: ranges (per split and over all), limits, outliers, extremes."""
    p = np.asarray(frames.poses, np.float64)
    ranges = {}
    for split in (*dict.fromkeys(frames.splits), "all"):
        sel = [i for i, s in enumerate(frames.splits) if split in ("all", s)]
        lo, hi = p[sel].min(axis=0).round(1), p[sel].max(axis=0).round(1)
        ranges[split] = {a: [float(lo[k]), float(hi[k])] for k, a in enumerate(AXES)}
    reasons = _reasons(frames)
    outliers = outlier_indices(frames)
    return {
        "ranges": ranges,
        "counts": dict(Counter(frames.splits)),
        "outlier_limits_deg": OUTLIER_LIMITS_DEG,
        "n_outliers": len(outliers),
        "outliers": [_entry(frames, i, "; ".join(reasons[i])) for i in outliers[:MAX_LISTED]],
        "extremes": [_entry(frames, i, what) for i, what in extremes(p).items()],
        "contact_sheet": None,
    }


def report_poses(folder: Path, frames: PoseFrames, pngs: dict[str, bytes]) -> dict[str, Any]:
    """:func:`summarise_poses` of the written frames, with the contact sheet written into
    ``folder`` from the crops at hand (PNG bytes by file; ``contact_sheet``: its file name)."""
    summary = summarise_poses(frames)
    rows = []
    for key, limit in (("extremes", None), ("outliers", SHEET_OUTLIERS)):
        entries = [e for e in summary[key][:limit] if e["file"] in pngs]
        if entries:
            crops = decode_rgb([pngs[e["file"]] for e in entries])
            labels = [f"y{e['yaw']:+.0f} p{e['pitch']:+.0f} r{e['roll']:+.0f}" for e in entries]
            rows.append(join([tile(c, t) for c, t in zip(crops, labels, strict=True)], axis=1))
    if rows:
        cv2.imwrite(str(folder / SHEET_NAME), join(rows, axis=0)[..., ::-1])
        summary["contact_sheet"] = SHEET_NAME
    return summary


def summary_lines(summary: dict[str, Any], sheet: Path | None) -> list[str]:
    """A few console lines: the overall ranges (per split in the manifest), the outliers (a
    few named), the contact sheet's path."""

    def span(r: dict[str, list[float]]) -> str:
        return " ".join(f"{a} {r[a][0]:+.0f}..{r[a][1]:+.0f}" for a in AXES)

    count = sum(summary["counts"].values())
    lines = [f"poses: {span(summary['ranges']['all'])} deg over {count} frames"]
    n, listed = summary["n_outliers"], summary["outliers"][:3]
    named = ", ".join(f"{e['file']} ({e['why']})" for e in listed)
    more = f" and {n - len(listed)} more (the manifest lists them)" if n > len(listed) else ""
    lines.append(f"pose outliers: {n} frames{': ' if n else ''}{named}{more}")
    if sheet is not None:
        lines.append(f"pose extremes: contact sheet {sheet}")
    return lines


def print_pose_summary(summary: dict[str, Any], shards_dir: Path) -> None:
    """:func:`summary_lines` of a prepared shard directory, on the console."""
    sheet = summary["contact_sheet"]
    print("\n".join(summary_lines(summary, shards_dir / sheet if sheet else None)), flush=True)


def print_pose_checks(report: Any) -> None:
    """Name the persons whose poses the 2D evidence questions (a :class:`PoseReport`; the
    manifest keeps the rest)."""
    for person, why in report.generic_reasons.items():
        if "contradicted" in why or "did not converge" in why:
            print(f"pose: {person}: single-image estimates ({why})")
    for person, what in report.yaw_contradicted.items():
        print(f"warning: pose: {person}: yaw opposite to the nose's side in {what}")
