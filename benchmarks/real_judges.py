"""Independent judges of generated faces against the real frames they stand for (dlib only).

    python benchmarks/real_judges.py --generated out/ --real targets/ --face_model model.txt

Both folders hold ``<person>/<file>`` images; a generated image is paired with the real frame of
the same relative path (the frame whose pose it was asked for).  None of the project's own
judges or pose fits take part:

* detection rate: dlib's HOG detector finds a face in the generated images, against the rate
  on the real frames;
* identity: dlib's face-recognition ResNet (``face-recognition-models``, 128-d descriptors of
  the face aligned on dlib's 5 points).  *verified*: the generated image and its real frame lie
  within :data:`VERIFY_THRESHOLD` (dlib's own same-person threshold); *top-1*: the nearest of
  the persons' mean real descriptors is the right person's (chance 1 / persons);
* pose: 68-point PnP on the 3D mean face of ``--face_model`` (``face68``: a local copy of
  head-pose-estimation's ``assets/model.txt``, not shipped here) of both, median absolute yaw
  and pitch difference.

An image without a detected face is judged in a box covering the whole image (generated
images are face crops), so every pair gets an identity and a pose; the detection rate says
how many needed it.  Copying the source photo is judged by passing the source photos, laid out
like the outputs, as ``--generated``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: dlib's face-recognition ResNet: descriptors closer than this are the same person.
VERIFY_THRESHOLD = 0.6
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


@dataclass(frozen=True)
class Judged:
    """What the judges read from one image."""

    detected: bool
    descriptor: np.ndarray  # [128]
    pose: tuple[float, float, float]  # 68-point PnP (yaw, pitch, roll), degrees


class DlibJudges:
    """HOG detector, 5- and 68-point shape predictors and the recognition ResNet, loaded once,
    and the [68, 3] 3D face of the PnP (``face68.load_face_model``)."""

    def __init__(self, face: np.ndarray) -> None:
        import dlib
        from face68 import Landmarks68

        from controlnet_ray.data.detect import DLIB_LANDMARK_MODELS, face_recognition_models_dir

        models = Path(face_recognition_models_dir())
        self._dlib = dlib
        self._face = face
        self._landmarks = Landmarks68()
        self._five = dlib.shape_predictor(str(models / DLIB_LANDMARK_MODELS[5]))
        self._resnet = dlib.face_recognition_model_v1(str(models / RECOGNITION_MODEL))

    def judge(self, image_rgb: np.ndarray) -> Judged:
        """Detect (else the whole image), describe and pose one RGB image."""
        from face68 import pnp_pose_68

        img = np.ascontiguousarray(image_rgb)
        h, w = img.shape[:2]
        box = self._landmarks.largest_box(img)
        detected = box is not None
        if box is None:
            box = np.array([0, 0, w - 1, h - 1], np.float64)
        rect = self._dlib.rectangle(*(int(round(float(v))) for v in box))
        descriptor = np.array(self._resnet.compute_face_descriptor(img, self._five(img, rect)))
        pose = pnp_pose_68(self._landmarks.in_box(img, box), w, h, self._face)
        return Judged(detected, descriptor, pose)


def paired_images(generated: Path, real: Path) -> list[tuple[str, Path, Path]]:
    """(person, generated image, real frame) for every ``<person>/<file>`` in both folders."""
    from controlnet_ray.inference import IMAGE_EXTENSIONS

    for flag, folder in (("--generated", generated), ("--real", real)):
        if not folder.is_dir():
            raise ValueError(f"{flag} {folder}: no such folder")
    pairs = [
        (g.parent.name, g, real / g.relative_to(generated))
        for g in sorted(generated.glob("*/*"))
        if g.suffix.lower() in IMAGE_EXTENSIONS
    ]
    missing = [str(r) for _, _, r in pairs if not r.is_file()]
    if missing:
        raise ValueError(
            f"--real {real}: no real frame for {len(missing)} images, e.g. {missing[0]}"
        )
    if not pairs:
        raise ValueError(f"--generated {generated}: no <person>/<image> files")
    return pairs


def top1(
    descriptors: np.ndarray, persons: list[str], real: np.ndarray, real_persons: list[str]
) -> float:
    """Share of ``descriptors`` whose nearest person-mean of the ``real`` ones is their person."""
    names = sorted(set(real_persons))
    owners = np.asarray(real_persons)
    means = np.stack([real[owners == n].mean(axis=0) for n in names])
    dist = np.linalg.norm(descriptors[:, None, :] - means[None, :, :], axis=-1)
    return float(
        np.mean([names[i] == p for i, p in zip(dist.argmin(axis=1), persons, strict=True)])
    )


@dataclass(frozen=True)
class JudgeReport:
    """The judged figures of one folder of generated images."""

    pairs: int
    persons: int
    detected_generated: float  # shares of images with a HOG face
    detected_real: float
    verified: float  # share of pairs within VERIFY_THRESHOLD
    top1: float
    yaw_err: float  # median absolute 68-point PnP difference, degrees
    pitch_err: float


def judge_pairs(pairs: list[tuple[str, Path, Path]], judges: DlibJudges) -> JudgeReport:
    """Judge every generated image against its real frame (:func:`paired_images`' pairs)."""
    from controlnet_ray.inference import read_image

    gen = [judges.judge(read_image(g)) for _, g, _ in pairs]
    ref = [judges.judge(read_image(r)) for _, _, r in pairs]
    persons = [p for p, _, _ in pairs]
    gd, rd = (np.stack([j.descriptor for j in js]) for js in (gen, ref))
    pose_diff = np.abs(np.array([j.pose for j in gen]) - np.array([j.pose for j in ref]))
    return JudgeReport(
        pairs=len(pairs),
        persons=len(set(persons)),
        detected_generated=float(np.mean([j.detected for j in gen])),
        detected_real=float(np.mean([j.detected for j in ref])),
        verified=float(np.mean(np.linalg.norm(gd - rd, axis=1) < VERIFY_THRESHOLD)),
        top1=top1(gd, persons, rd, persons),
        yaw_err=float(np.median(pose_diff[:, 0])),
        pitch_err=float(np.median(pose_diff[:, 1])),
    )


def format_report(r: JudgeReport) -> str:
    """Two lines: the figures, with the detection rate relative to the real frames'."""
    ratio = r.detected_generated / r.detected_real if r.detected_real else float("nan")
    return (
        f"{r.pairs} pairs of {r.persons} persons (top-1 chance {100 / r.persons:.0f} %)\n"
        f"faces detected {100 * r.detected_generated:.0f} % (real frames "
        f"{100 * r.detected_real:.0f} %, ratio {ratio:.2f}); verified {100 * r.verified:.0f} %; "
        f"top-1 {100 * r.top1:.0f} %; 68-point PnP yaw err {r.yaw_err:.1f}, pitch err "
        f"{r.pitch_err:.1f} deg"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the judged figures; exit 2 on bad input."""
    import json

    from face68 import FACE_MODEL_HELP, load_face_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--generated", required=True, help="folder of <person>/<image> outputs")
    p.add_argument("--real", required=True, help="folder of the real frames, same relative paths")
    p.add_argument("--face_model", required=True, metavar="PATH", help=FACE_MODEL_HELP)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    from controlnet_ray.inference import InferenceError

    try:
        face = load_face_model(Path(args.face_model).expanduser())
        pairs = paired_images(Path(args.generated), Path(args.real))
        report = judge_pairs(pairs, DlibJudges(face))
    except (ValueError, InferenceError) as exc:  # face68.FaceModelError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
