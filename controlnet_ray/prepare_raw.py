"""``python -m controlnet_ray.prepare_raw``: raw photos and videos -> the original data layout.

Example::

    python -m controlnet_ray.prepare_raw --photos raw/photos --videos raw/videos \\
        --out data/train/datas/file --detector insightface \\
        --face_models ~/.insightface/models/buffalo_l

For every photo (one person per photo; person name = file stem) the largest face is detected;
every ``--every_k``-th frame of every video (person = file stem, paired with the photo of the
same stem) likewise.  Images are written as JPEGs where the original extraction put them::

    <root>/train/datas/face/<name>.jpg
    <root>/train/datas/video/<name>/<name>frame_{i:06d}.jpg      (i = frame number in the video)

with ``--out`` = ``<root>/train/datas/file``, and the metadata (boxes, 5 landmarks, the legacy
poses/keypoints) via ``data.layout.write_legacy_dataset``, so training reads it like original
data.  Photos, videos and frames without a face (or unreadable) are listed in
``<out>/failures.json`` and counted in the printed summary, never silently dropped.

Detectors (``data.detect``): ``insightface`` (SCRFD from a local model pack, what the original
data were made with; nothing is downloaded) or ``dlib`` (offline, ``pip install dlib-bin
face-recognition-models``; approximate nose/mouth points, see ``data.detect``).  ``auto``:
insightface when ``--face_models`` is given, else dlib.  Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controlnet_ray.config import DEVICE_CHOICES
from controlnet_ray.data.detect import (
    DETECTORS,
    DetectedFace,
    DetectorError,
    FaceDetector,
    largest_face,
)
from controlnet_ray.inference import IMAGE_EXTENSIONS, InferenceError, read_image

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
LAYOUT_TAIL = ("train", "datas", "file")
FACE_DIR = ("train", "datas", "face")
VIDEO_DIR = ("train", "datas", "video")
FAILURES_FILE = "failures.json"
JPEG_QUALITY = 95


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m controlnet_ray.prepare_raw",
        description="Detect faces in raw photos and videos and write the original data layout.",
    )
    p.add_argument("--photos", default=None, help="folder of photos, one person each (stem=name)")
    p.add_argument("--videos", default=None, help="folder of videos (stem = person name)")
    p.add_argument("--out", required=True, help="DATA_DIR = <root>/train/datas/file")
    p.add_argument("--every_k", type=int, default=10, help="sample every k-th video frame (10)")
    p.add_argument("--max_frames", type=int, default=0, help="sampled frames per video (0: all)")
    p.add_argument("--detector", choices=DETECTORS, default="auto")
    p.add_argument("--face_models", default=None, help="InsightFace model-pack folder")
    p.add_argument(
        "--dlib_landmarks",
        type=int,
        choices=(5, 68),
        default=5,
        help="dlib landmark model: 5 (default, permissive licence) or 68 (iBUG "
        "300-W data: non-commercial licence)",
    )
    p.add_argument("--device", choices=DEVICE_CHOICES, default="cpu")
    p.add_argument("--feature_dim", type=int, default=512, help="written into the metadata")
    p.add_argument("--overwrite", action="store_true", help="replace existing metadata in --out")
    return p


def _validate(args: argparse.Namespace) -> Path:
    """Flag checks; returns the layout root (``--out`` minus ``train/datas/file``)."""
    if args.photos is None and args.videos is None:
        raise InferenceError("give --photos DIR and/or --videos DIR")
    for flag in ("photos", "videos"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_dir():
            raise InferenceError(f"--{flag} {value}: no such folder")
    if args.every_k < 1 or args.max_frames < 0:
        raise InferenceError("--every_k must be >= 1 and --max_frames >= 0")
    out = Path(args.out).expanduser().resolve()
    if out.parts[-3:] != LAYOUT_TAIL:
        raise InferenceError(
            f"--out {args.out}: must end with {'/'.join(LAYOUT_TAIL)} (the original layout, "
            "e.g. /data/mine/train/datas/file); images go to the sibling face/ and video/"
        )
    if (out / "front_metadata.json").exists() and not args.overwrite:
        raise InferenceError(f"--out {out} already holds a dataset; pass --overwrite to replace")
    return out.parents[2]


# --------------------------------------------------------------------------- collection


@dataclass
class Collected:
    """What was found: layout records, failures and counters for the summary."""

    fronts: list[Any] = field(default_factory=list)  # layout.ImageRecord
    videos: list[Any] = field(default_factory=list)
    failures: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"photos": [], "videos": [], "frames": []}
    )
    multi_face: dict[str, int] = field(default_factory=dict)  # photo -> faces seen
    frames_sampled: int = 0
    photos_seen: int = 0
    videos_seen: int = 0


def _files(folder: str | None, extensions: tuple[str, ...]) -> list[Path]:
    if folder is None:
        return []
    return sorted(
        p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in extensions
    )


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    """Encode in memory and write the bytes (non-ASCII paths work everywhere)."""
    import cv2

    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise InferenceError(f"JPEG encoding failed for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _record(name: str, rel: str, rgb: np.ndarray, face: DetectedFace, frame: str | None) -> Any:
    from controlnet_ray.data.layout import ImageRecord

    h, w = rgb.shape[:2]
    return ImageRecord(
        person_name=name,
        image_relpath=rel,
        image_size=(w, h),
        box=[float(v) for v in face.box],
        landmarks_2d=np.asarray(face.landmarks, np.float64),
        frame_index=frame,
    )


def _unfittable(rgb: np.ndarray, face: DetectedFace) -> str | None:
    """Why the legacy PnP (which the metadata writer runs) rejects these landmarks, or None."""
    from controlnet_ray.data.legacy import LegacyFitError, legacy_fit

    h, w = rgb.shape[:2]
    try:
        legacy_fit(np.asarray(face.landmarks, np.float64), (w, h))
    except LegacyFitError as exc:
        return f"legacy pose fit failed: {exc}"
    return None


def collect_photos(folder: str | None, root: Path, detector: FaceDetector, acc: Collected) -> None:
    """Largest face of every photo, written to ``train/datas/face/<stem>.jpg``."""
    for path in _files(folder, IMAGE_EXTENSIONS):
        acc.photos_seen += 1
        try:
            rgb = read_image(path)
        except InferenceError as exc:
            acc.failures["photos"].append({"file": str(path), "reason": str(exc)})
            continue
        faces = detector.detect(rgb)
        face = largest_face(faces)
        if face is None:
            acc.failures["photos"].append({"file": str(path), "reason": "no face found"})
            continue
        reason = _unfittable(rgb, face)
        if reason:
            acc.failures["photos"].append({"file": str(path), "reason": reason})
            continue
        if len(faces) > 1:
            acc.multi_face[path.name] = len(faces)
        rel = "/".join((*FACE_DIR, f"{path.stem}.jpg"))
        _write_jpeg(root / rel, rgb)
        acc.fronts.append(_record(path.stem, rel, rgb, face, None))


def sampled_frames(path: Path, every_k: int, max_frames: int) -> Iterator[tuple[int, np.ndarray]]:
    """(frame number, RGB) of every ``every_k``-th frame; skipped frames are grabbed, not decoded.

    Raises InferenceError when the file cannot be opened or yields no frame at all.
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise InferenceError(f"{path}: not a readable video")
    try:
        index, sampled = 0, 0
        while not max_frames or sampled < max_frames:
            if not cap.grab():
                break
            if index % every_k == 0:
                ok, bgr = cap.retrieve()
                if not ok:
                    raise InferenceError(f"{path}: frame {index} cannot be decoded")
                sampled += 1
                yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
        if index == 0:
            raise InferenceError(f"{path}: no frames could be read")
    finally:
        cap.release()


def collect_videos(
    folder: str | None,
    root: Path,
    detector: FaceDetector,
    acc: Collected,
    every_k: int,
    max_frames: int,
) -> None:
    """Largest face of every sampled frame, written under ``train/datas/video/<stem>/``."""
    for path in _files(folder, VIDEO_EXTENSIONS):
        acc.videos_seen += 1
        name = path.stem
        try:
            for index, rgb in sampled_frames(path, every_k, max_frames):
                acc.frames_sampled += 1
                face = largest_face(detector.detect(rgb))
                reason = "no face found" if face is None else _unfittable(rgb, face)
                if reason:
                    entry = {"video": str(path), "frame": index, "reason": reason}
                    acc.failures["frames"].append(entry)
                    continue
                frame = f"{name}frame_{index:06d}"
                rel = "/".join((*VIDEO_DIR, name, f"{frame}.jpg"))
                _write_jpeg(root / rel, rgb)
                acc.videos.append(_record(name, rel, rgb, face, frame))
        except InferenceError as exc:
            acc.failures["videos"].append({"file": str(path), "reason": str(exc)})


# --------------------------------------------------------------------------- output


def write_failures(out: Path, acc: Collected) -> Path:
    """``failures.json`` beside the metadata: every photo/video/frame left out, and why."""
    doc = {
        "counts": {k: len(v) for k, v in acc.failures.items()},
        **acc.failures,
        "photos_with_several_faces": acc.multi_face,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / FAILURES_FILE
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def summary(acc: Collected) -> str:
    """Human summary: counts, failures, and how photos and videos paired up by name."""
    photo_names = {r.person_name for r in acc.fronts}
    video_names = {r.person_name for r in acc.videos}
    f = acc.failures
    lines = [
        f"photos: {len(acc.fronts)} of {acc.photos_seen} with a face ({len(f['photos'])} failed)",
        f"videos: {acc.videos_seen - len(f['videos'])} of {acc.videos_seen} readable, "
        f"{acc.frames_sampled} frames sampled, {len(acc.videos)} with a face "
        f"({len(f['frames'])} without)",
        f"persons: {len(photo_names | video_names)} ({len(photo_names & video_names)} with photo "
        f"and video, {len(photo_names - video_names)} photo only, "
        f"{len(video_names - photo_names)} video only)",
    ]
    if acc.multi_face:
        shown = ", ".join(f"{k} ({v})" for k, v in list(acc.multi_face.items())[:5])
        lines.append(f"photos with several faces (largest kept): {shown}")
    if not acc.videos:
        lines.append("warning: no video frame with a face: front_to_video training needs videos")
    unpaired = sorted(photo_names ^ video_names)[:10]
    if unpaired:
        lines.append(
            "warning: unpaired persons give no front_to_video training pairs: "
            + ", ".join(unpaired)
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, root: Path) -> int:
    from controlnet_ray.data.detect import build_detector
    from controlnet_ray.data.layout import write_legacy_dataset

    detector = build_detector(
        args.detector, args.face_models, device=args.device, dlib_landmarks=args.dlib_landmarks
    )
    print(f"detector: {detector.name}")
    out = root.joinpath(*LAYOUT_TAIL)
    acc = Collected()
    collect_photos(args.photos, root, detector, acc)
    collect_videos(args.videos, root, detector, acc, args.every_k, args.max_frames)
    failures = write_failures(out, acc)
    print(summary(acc))
    if not acc.fronts:
        print(
            f"error: no face found in any photo; nothing written (see {failures})", file=sys.stderr
        )
        return 2
    write_legacy_dataset(out, acc.fronts, acc.videos, repo_root=root, feature_dim=args.feature_dim)
    print(f"wrote {out} (metadata, keypoints; failures listed in {failures})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args, _validate(args))
    except (InferenceError, DetectorError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
