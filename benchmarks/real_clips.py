"""A real benchmark from talking-head example clips, and how its pose labels agree with
independent estimates.

    python benchmarks/real_clips.py --clips /work/.mirror/KwaiVGI+LivePortrait/repo \\
        --face_model model.txt --work /tmp/real_clips [--every_k 6] [--max_frames 40] \\
        [--json agreement.json]

What it needs: a local snapshot of KwaiVGI/LivePortrait (https://github.com/KwaiVGI/LivePortrait):
a clone, or the bare git directory a snapshot tool leaves (e.g. ``fetch
github:KwaiVGI/LivePortrait``).  Its example clips ``assets/examples/driving/*.mp4`` and
``assets/examples/source/*.mp4`` (17 talking heads, one person each) are copied to
``<work>/videos``.  ``--clips`` may instead name a folder holding clips (any other source; one
person per clip, file stem = name).  The clips stay outside this repository: they carry their
owners' licences.  dlib and ``face-recognition-models`` must be installed (``pip install
dlib-bin face-recognition-models``).  ``--face_model`` is a local copy of ``assets/model.txt``
of https://github.com/yinguobing/head-pose-estimation, the 68-point 3D mean face for the PnP
(values from OpenFace's mean shape, for research use; see ``face68``, not shipped here).

Steps:

1. The clips are extracted; each clip's frame ``every_k // 2`` (a frame the sampling skips; the
   driving clips are meant to open on a frontal face) becomes the person's photo in
   ``<work>/photos``.
2. ``python -m controlnet_ray.prepare_raw --detector dlib`` writes the original layout under
   ``<work>/data/train/datas/file`` (skipped with ``--reuse`` when it is already there).
3. The prepared yaw labels are computed as ``python -m controlnet_ray.prepare`` computes them
   (``data.pose.estimate_dataset_poses`` on the stored landmarks) and compared, per person and
   overall, with two references that share nothing with them: dlib's 68 points in each stored
   face box with PnP on the 3D mean face of ``--face_model`` (``face68``), and the 68-point
   nose tip's side of the face's vertical axis (``data.pose.evidence.nose_offset``, no 3D model).

Prints the table of ``label_agreement``.  Exit status 0 whether or not the targets are met
(the verdict line says so), 2 on bad input, or ``prepare_raw``'s own status when it fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from controlnet_ray.data.layout import LegacyDataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from controlnet_ray.data.detect import DetectorError  # noqa: E402
from controlnet_ray.data.layout import DataError  # noqa: E402
from controlnet_ray.data.pose import PoseFitError  # noqa: E402
from controlnet_ray.prepare_raw import VIDEO_EXTENSIONS  # noqa: E402

#: Where the clips live in the expected repository's snapshot.
EXPECTED_REPO = "KwaiVGI/LivePortrait"
CLIP_DIRS = ("assets/examples/driving", "assets/examples/source")
#: A clearly turned frame by the 68-point PnP (degrees): above its change between sampled
#: frames on LivePortrait's clips (median 0.7, 90th percentile 3.2 deg, 6 frames apart).
CLEAR_YAW_DEG = 5.0
LFS_POINTER = b"version https://git-lfs"


class BenchmarkError(RuntimeError):
    """Bad input; the message names the path or flag."""


# --------------------------------------------------------------------------- clips


def _git(git_dir: Path, *args: str) -> bytes:
    done = subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True)
    if done.returncode:
        raise BenchmarkError(f"--clips {git_dir}: git {args[0]} failed: {done.stderr.decode()}")
    return done.stdout


def _is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def _videos_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)


def list_clips(source: Path) -> dict[str, str]:
    """Person name -> where its clip is: a path inside a git snapshot (``git:<path>``) or a file.

    ``source`` is a checkout or bare git directory of :data:`EXPECTED_REPO`, or a folder of clips.
    """
    if not source.is_dir():
        raise BenchmarkError(f"--clips {source}: no such folder")
    if _is_git_dir(source) or _is_git_dir(source / ".git"):
        git_dir = source if _is_git_dir(source) else source / ".git"
        listed = _git(git_dir, "ls-tree", "-r", "--name-only", "HEAD", "--", *CLIP_DIRS)
        paths = [p for p in listed.decode().splitlines() if Path(p).suffix in VIDEO_EXTENSIONS]
        found = {Path(p).stem: f"git:{p}" for p in paths}
    else:
        dirs = [source / d for d in CLIP_DIRS if (source / d).is_dir()] or [source]
        paths = [str(p) for d in dirs for p in _videos_in(d)]
        found = {Path(p).stem: p for p in paths}
    if len(found) != len(paths):
        raise BenchmarkError(f"--clips {source}: two clips share a file stem (a person's name)")
    if not found:
        raise BenchmarkError(
            f"--clips {source}: no clips in {' or '.join(CLIP_DIRS)} (a snapshot of "
            f"{EXPECTED_REPO}) nor in the folder itself"
        )
    return found


def extract_clips(source: Path, dest: Path) -> list[Path]:
    """Copy every clip of ``source`` to ``dest/<name><ext>``; LFS pointers are an error."""
    dest.mkdir(parents=True, exist_ok=True)
    git_dir = source if _is_git_dir(source) else source / ".git"
    out = []
    for name, where in list_clips(source).items():
        if where.startswith("git:"):
            data = _git(git_dir, "cat-file", "blob", f"HEAD:{where[4:]}")
        else:
            data = Path(where).read_bytes()
        if data.startswith(LFS_POINTER):
            raise BenchmarkError(f"--clips {source}: {where} is a Git LFS pointer, not a video")
        target = dest / f"{name}{Path(where).suffix.lower()}"
        target.write_bytes(data)
        out.append(target)
    return out


def write_photo(video: Path, frame: int, dest: Path) -> Path:
    """Frame ``frame`` of ``video`` as ``dest/<stem>.png`` (the person's photo)."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    try:
        for _ in range(frame + 1):
            ok, bgr = cap.read()
            if not ok:
                raise BenchmarkError(f"{video}: has no frame {frame} to use as the photo")
    finally:
        cap.release()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{video.stem}.png"
    if not cv2.imwrite(str(path), bgr):
        raise BenchmarkError(f"{path}: cannot be written")
    return path


def run_prepare_raw(work: Path, args: argparse.Namespace) -> int:
    """``python -m controlnet_ray.prepare_raw`` on the photos and clips; its exit status."""
    cmd = [sys.executable, "-m", "controlnet_ray.prepare_raw", "--detector", "dlib"]
    cmd += ["--photos", str(work / "photos"), "--videos", str(work / "videos")]
    cmd += ["--out", str(data_dir(work)), "--every_k", str(args.every_k)]
    cmd += ["--max_frames", str(args.max_frames), "--overwrite"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def data_dir(work: Path) -> Path:
    return work / "data" / "train" / "datas" / "file"


# --------------------------------------------------------------------------- measurement


def prepared_labels(data: Path) -> tuple[LegacyDataset, np.ndarray]:
    """(the legacy dataset, its [N, 3] pose labels as ``prepare`` estimates them)."""
    from controlnet_ray.data.layout import read_legacy_dataset
    from controlnet_ray.data.pose import estimate_dataset_poses

    ds = read_legacy_dataset(data, cwd=data.parents[2])  # the layout's root holds the images
    poses, report = estimate_dataset_poses(
        ds.person_names(),
        ds.roles(),
        ds.landmarks_2d(),
        ds.image_sizes(),
        min_images=4,
        labels=[e.image_path for e in ds.entries],
    )
    for person, why in {**report.generic_reasons, **report.yaw_contradicted}.items():
        print(f"prepare's own pose check: {person}: {why}")
    return ds, np.asarray(poses, np.float64)


def independent_estimates(ds: LegacyDataset, face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([N, 3] 68-point PnP poses on ``face``, [N] 68-point nose offsets) of every stored image."""
    from face68 import Landmarks68, pnp_pose_68

    from controlnet_ray.data.detect import dlib68_to_insightface
    from controlnet_ray.data.pose.evidence import nose_offset
    from controlnet_ray.inference import read_image

    detector = Landmarks68()
    poses, offsets = [], []
    for entry in ds.entries:
        points = detector.in_box(read_image(entry.resolved_path), entry.box)
        poses.append(pnp_pose_68(points, *entry.image_size, face))
        offsets.append(float(nose_offset(dlib68_to_insightface(points))))
    return np.array(poses), np.array(offsets)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from face68 import FACE_MODEL_HELP, FACE_MODEL_REPO

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=f"Get the clips with: git clone --depth 1 https://github.com/{EXPECTED_REPO} DIR "
        "(or any snapshot of it), then --clips DIR.  Get the face model with: git clone "
        f"--depth 1 {FACE_MODEL_REPO} HPE, then --face_model HPE/assets/model.txt.  Needs: "
        "pip install dlib-bin face-recognition-models.  The clips and the face model stay out "
        "of this repository (their licences).",
    )
    p.add_argument(
        "--clips",
        required=True,
        help=f"snapshot of {EXPECTED_REPO} (checkout or bare git dir; clips under "
        f"{' and '.join(CLIP_DIRS)}) or a folder of clips",
    )
    p.add_argument("--face_model", required=True, metavar="PATH", help=FACE_MODEL_HELP)
    p.add_argument("--work", required=True, help="work folder: videos/, photos/, data/")
    p.add_argument("--every_k", type=int, default=6, help="prepare_raw's frame step (6)")
    p.add_argument("--max_frames", type=int, default=40, help="frames per clip (40)")
    p.add_argument("--reuse", action="store_true", help="keep an already prepared <work>/data")
    p.add_argument("--json", default=None, help="write the table's figures here")
    return p


def prepare(args: argparse.Namespace, work: Path) -> int:
    """Clips, photos and prepare_raw; 0 or prepare_raw's failing status."""
    if args.reuse and (data_dir(work) / "front_metadata.json").is_file():
        print(f"reusing {data_dir(work)}")
        return 0
    videos = extract_clips(Path(args.clips).expanduser(), work / "videos")
    for video in videos:
        write_photo(video, args.every_k // 2, work / "photos")
    print(f"{len(videos)} clips from {args.clips} in {work / 'videos'}")
    return run_prepare_raw(work, args)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    from face68 import FaceModelError, load_face_model
    from label_agreement import format_table, person_rows, rows_to_json

    from controlnet_ray.data.pose.evidence import CLEAR_TURN

    args = build_parser().parse_args(argv)
    try:
        if args.every_k < 2 or args.max_frames < 1:
            raise BenchmarkError(
                "--every_k must be >= 2 (a skipped frame is the photo), --max_frames >= 1"
            )
        face = load_face_model(Path(args.face_model).expanduser())
        work = Path(args.work).expanduser().resolve()
        status = prepare(args, work)
        if status:
            return status
        ds, labels = prepared_labels(data_dir(work))
        pnp, nose = independent_estimates(ds, face)
    except (BenchmarkError, FaceModelError, DataError, DetectorError, PoseFitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = person_rows(ds.person_names(), labels, pnp, nose, CLEAR_YAW_DEG, CLEAR_TURN)
    print(
        f"sign: labelled with the reference's sign / clearly turned frames "
        f"(|68-PnP yaw| >= {CLEAR_YAW_DEG:g} deg, |nose offset| >= {CLEAR_TURN:g} eye-to-mouth)"
    )
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows_to_json(rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
