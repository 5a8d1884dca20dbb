"""``python -m controlnet_ray.generate``: turn a face to a target head pose.

Examples::

    python -m controlnet_ray.generate --checkpoint best_model.pth --image face.jpg \\
        --yaw 30 --pitch 0 --roll 0 --out out.png
    python -m controlnet_ray.generate --checkpoint model.onnx --image face.jpg \\
        --sweep yaw=-60:60:15 --out turn.png          # writes turn.png (grid) and turn.gif
    python -m controlnet_ray.generate --checkpoint best_model.pth --image faces/ --out out/

Input: an aligned crop (an image already ``image_size`` square, or any image with ``--aligned``)
is used as is, with source pose ``--source_yaw/--source_pitch/--source_roll`` (default 0: a
frontal crop).  Any other image is a photo: the largest face is detected (``--detector``) or
``--landmarks`` are given, then it is aligned like the training data and its source pose is
estimated from the landmarks (``--source_*`` still override single axes).

Angles beyond yaw +-90, pitch +-60, roll +-60 degrees are refused, not clamped; requested
poses beyond those the model was trained on (its checkpoint's training data, else the embedded
set's yaw +-72, pitch +-30, roll +-20) get a warning.  A photo's pose is estimated as the
training data's single-image estimates were (the checkpoint's mean face and bias).  Outputs
never create folders: ``--out``'s folder (batch mode: ``--out`` itself) must exist.  Exit
status: 0 ok, 1 some images of a batch failed (listed), 2 bad input.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from controlnet_ray.config import DEVICE_CHOICES
from controlnet_ray.data.detect import DETECTORS, DetectorError
from controlnet_ray.inference import (
    AXES,
    POSE_LIMITS_DEG,
    InferenceError,
    PreparedFace,
    Runner,
    Sweep,
    beyond_training,
    check_output_path,
    check_pose,
    format_pose,
    label_tile,
    list_images,
    parse_landmarks,
    parse_sweep,
    prepare_face,
    read_image,
    run_batched,
    run_cli,
    to_model_input,
    to_rgb8,
    write_image,
)

GIF_FRAME_MS = 120


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m controlnet_ray.generate",
        description="Generate a face at a target head pose (yaw, pitch, roll in degrees).",
        epilog="Pose convention: controlnet_ray.data.geometry (yaw > 0 turns the nose to the "
        "image's right, pitch > 0 lifts it, roll > 0 tilts the head counter-clockwise). "
        "Angles beyond yaw +-90, pitch +-60, roll +-60 are refused; poses beyond those the model "
        "was trained on (its checkpoint's training data, else yaw +-72, pitch +-30, roll +-20) "
        "are warned about.",
    )
    p.add_argument("--checkpoint", required=True, help="training .pth or exported .onnx")
    p.add_argument("--image", required=True, help="an image file, or a folder (batch mode)")
    p.add_argument("--out", required=True, help="output image (.png), or a folder in batch mode")
    for axis in AXES:
        p.add_argument(f"--{axis}", type=float, default=0.0, help=f"target {axis} (deg, 0)")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="AXIS=START:STOP:STEP",
        help="sweep an axis (repeatable, e.g. --sweep yaw=-60:60:30 --sweep pitch=-20:20:20; "
        "or AXIS=V1,V2,...): writes a grid PNG at --out and an animated GIF beside it",
    )
    p.add_argument("--aligned", action="store_true", help="the input is an aligned face crop")
    p.add_argument(
        "--landmarks",
        default=None,
        metavar="x1,y1,...,x5,y5",
        help="5 landmarks of the face in the photo (eyes, nose tip, mouth corners; "
        "image-left first), instead of a detector; write --landmarks=-1,... when the first "
        "number is negative",
    )
    for axis in AXES:
        p.add_argument(
            f"--source_{axis}",
            type=float,
            default=None,
            help=f"source {axis} (deg); default: estimated for photos, 0 for aligned crops",
        )
    p.add_argument("--detector", choices=DETECTORS, default="auto", help="face detector (auto)")
    p.add_argument("--face_models", default=None, help="InsightFace model-pack folder (buffalo_l)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    return p


# --------------------------------------------------------------------------- validation


def _validate(args: argparse.Namespace) -> list[Sweep]:
    """Everything checkable before loading a model; InferenceError names the flag."""
    sweeps = [parse_sweep(s) for s in args.sweep]
    axes = [s.axis for s in sweeps]
    if len(set(axes)) != len(axes):
        raise InferenceError(f"--sweep: each axis at most once, got {axes}")
    fixed = [getattr(args, a) for a in AXES]
    check_pose(fixed, "target (--yaw/--pitch/--roll)")
    for s in sweeps:
        for v in s.values:
            check_pose([v if a == s.axis else 0.0 for a in AXES], f"--sweep {s.axis}")
    source = [getattr(args, f"source_{a}") for a in AXES]
    check_pose([0.0 if v is None else v for v in source], "source (--source_*)")
    if not Path(args.checkpoint).is_file():
        raise InferenceError(f"--checkpoint {args.checkpoint}: file not found")
    image = Path(args.image)
    if not image.exists():
        raise InferenceError(f"--image {image}: no such file or folder")
    if image.is_dir():
        _validate_batch(args)
    elif sweeps:
        _sweep_paths(check_output_path(args.out))
    else:
        check_output_path(args.out)
    return sweeps


def _validate_batch(args: argparse.Namespace) -> None:
    if args.landmarks is not None:
        raise InferenceError("--landmarks applies to one image, not to a folder (--image DIR)")
    out = Path(args.out)
    if not out.is_dir():
        raise InferenceError(
            f"--out {out}: batch mode (--image is a folder) needs an existing output folder "
            "(outputs never create folders)"
        )


def _sweep_paths(out: Path) -> tuple[Path, Path]:
    if out.suffix.lower() != ".png":
        raise InferenceError(f"--out {out}: with --sweep, give the grid's .png path (GIF beside)")
    return out, out.with_suffix(".gif")


# --------------------------------------------------------------------------- one image


def sweep_targets(sweeps: Sequence[Sweep], fixed: Sequence[float]) -> list[tuple[float, ...]]:
    """Target poses of a sweep; the first sweep varies fastest (it is a grid row)."""
    base = dict(zip(AXES, fixed, strict=True))
    combos = itertools.product(*(s.values for s in reversed(sweeps)))
    out = []
    for combo in combos:
        pose = dict(base) | dict(zip((s.axis for s in reversed(sweeps)), combo, strict=True))
        out.append(tuple(float(pose[a]) for a in AXES))
    return out


def _label(pose: Sequence[float]) -> str:
    return " ".join(f"{a[0]}{float(v):+.0f}" for a, v in zip(AXES, pose, strict=True))


def _generate(runner: Runner, face: PreparedFace, targets: list[tuple[float, ...]]) -> np.ndarray:
    n = len(targets)
    images = np.repeat(to_model_input(face.crop)[None], n, axis=0)
    source = np.repeat(np.asarray([face.source_pose], np.float32), n, axis=0)
    return run_batched(runner, images, source, np.asarray(targets, np.float32))


def _write_sweep(
    out: Path, face: PreparedFace, outputs: np.ndarray, targets: list, row_len: int
) -> list[Path]:
    """Grid PNG (each row: source, then the row's targets) and a ping-pong GIF beside it."""
    from PIL import Image

    from controlnet_ray.inference import grid

    png, gif = _sweep_paths(out)
    tiles = [label_tile(to_rgb8(o), _label(t)) for o, t in zip(outputs, targets, strict=True)]
    source = label_tile(face.crop, "source")
    rows = [[source, *tiles[i : i + row_len]] for i in range(0, len(tiles), row_len)]
    write_image(png, grid(rows))
    frames = tiles + tiles[-2:0:-1]  # there and back: a smooth loop
    pil = [Image.fromarray(f) for f in frames]
    pil[0].save(gif, save_all=True, append_images=pil[1:], duration=GIF_FRAME_MS, loop=0)
    return [png, gif]


def process_image(
    path: Path,
    out: Path,
    args: argparse.Namespace,
    runner: Runner,
    sweeps: list[Sweep],
    detector: Callable[[], Any] | None,
) -> list[Path]:
    """Prepare, run and write one image; returns the files written."""
    landmarks = parse_landmarks(args.landmarks) if args.landmarks is not None else None
    face = prepare_face(
        read_image(path),
        runner.image_size,
        name=str(path),
        aligned=args.aligned,
        landmarks=landmarks,
        source_pose=[getattr(args, f"source_{a}") for a in AXES],
        detector=detector,
        framing=runner.framing,
        pose_model=runner.pose_model,
    )
    _warn_source_range(path, face)
    fixed = [getattr(args, a) for a in AXES]
    targets = sweep_targets(sweeps, fixed) if sweeps else [tuple(fixed)]
    outputs = _generate(runner, face, targets)
    print(f"{path}: source pose {format_pose(face.source_pose)} ({face.pose_origin})")
    if sweeps:
        return _write_sweep(out, face, outputs, targets, len(sweeps[0].values))
    return [write_image(out, to_rgb8(outputs[0]))]


def _warn_source_range(path: Path, face: PreparedFace) -> None:
    outside = [
        f"{a} {v:+.1f}"
        for a, v in zip(AXES, face.source_pose, strict=True)
        if abs(v) > POSE_LIMITS_DEG[a]
    ]
    if outside:
        print(
            f"warning: {path}: estimated source pose outside the range a model accepts "
            f"({', '.join(outside)}); results will be poor",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- main


def _detector_factory(args: argparse.Namespace) -> Callable[[], Any] | None:
    """Lazily built (and cached) detector; None when ``auto`` finds none (prepare_face says so)."""
    from controlnet_ray.data.detect import build_detector, dlib_available

    if args.detector == "auto" and args.face_models is None and not dlib_available():
        return None
    cache: list[Any] = []

    def factory() -> Any:
        if not cache:
            device = "cpu" if args.device == "cpu" else "auto"
            # dlib's 68 points: its 5-point model has no mouth corners (they are guessed), and the
            # head framing's translation solve leans on all five points
            cache.append(
                build_detector(args.detector, args.face_models, device=device, dlib_landmarks=68)
            )
        return cache[0]

    return factory


def _batch_jobs(folder: Path, out_dir: Path, sweeping: bool) -> list[tuple[Path, Path]]:
    files = list_images(folder)
    stems = [f.stem for f in files]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise InferenceError(
            f"--image {folder}: several files share a name stem ({', '.join(clashes[:5])}); "
            "outputs are named <stem>.png, rename them"
        )
    suffix = "_sweep.png" if sweeping else ".png"
    return [(f, out_dir / f"{f.stem}{suffix}") for f in files]


def run(args: argparse.Namespace, sweeps: list[Sweep]) -> int:
    """Load the model once, then process the image or every image of the folder."""
    from controlnet_ray.inference import open_runner

    runner = open_runner(args.checkpoint, args.device)
    print(f"model: {runner.description}, image size {runner.image_size}")
    fixed = [getattr(args, a) for a in AXES]
    warning = beyond_training(
        sweep_targets(sweeps, fixed) if sweeps else [fixed], runner.pose_model.trained_range_deg
    )
    if warning:
        print(warning, file=sys.stderr)
    detector = _detector_factory(args)
    image = Path(args.image)
    if not image.is_dir():
        written = process_image(image, Path(args.out), args, runner, sweeps, detector)
        print("wrote " + ", ".join(map(str, written)))
        return 0
    failed = []
    jobs = _batch_jobs(image, Path(args.out), bool(sweeps))
    for src, dst in jobs:
        try:
            written = process_image(src, dst, args, runner, sweeps, detector)
            print("  wrote " + ", ".join(map(str, written)))
        except (InferenceError, DetectorError) as exc:
            failed.append(src)
            print(f"FAILED {src}: {exc}", file=sys.stderr)
    print(f"done: {len(jobs) - len(failed)} of {len(jobs)} images, {len(failed)} failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    return run_cli(argv, build_parser(), _validate, run, errors=(DetectorError,))


if __name__ == "__main__":
    sys.exit(main())
