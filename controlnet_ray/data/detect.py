"""Face detectors for raw photos and video frames, each giving boxes and InsightFace's 5 points.

Every detector returns :class:`DetectedFace` objects whose ``landmarks`` are the five points in
InsightFace's order (image-left eye centre, image-right eye centre, nose tip, image-left mouth
corner, image-right mouth corner), in pixels of the full input image, so alignment
(``data.align``) and pose estimation (``data.pose``) never care which detector ran.

* :class:`InsightFaceDetector` -- SCRFD from a local InsightFace model pack (e.g. ``buffalo_l``'s
  ``det_10g.onnx``).  The production path: it is what the original data were extracted with.
  The ONNX file is opened by path with ``insightface.model_zoo.get_model`` after checking it
  exists, so nothing can be downloaded.
* :class:`DlibDetector` -- dlib's HOG face detector plus a shape predictor shipped by the
  ``face-recognition-models`` package (``pip install dlib-bin face-recognition-models``), fully
  offline.  Landmarks come from the 5-point model by default (dlib's own permissively licensed
  data); the 68-point model is exact but trained on iBUG 300-W, whose licence excludes
  commercial use, so it is opt-in (``landmarks=68``).  The 5-point model gives eye corners and
  the nose base, not InsightFace's points; :func:`dlib5_to_insightface` poses a 3D face on
  them and projects its nose tip and mouth corners.

Images are RGB ``uint8`` arrays ``[H, W, 3]`` throughout.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from controlnet_ray.data.geometry import head_to_camera, project
from controlnet_ray.data.pose.mean_face import MEAN_FACE_3D, NOSE

DETECTORS = ("auto", "insightface", "dlib")
DLIB_LANDMARK_MODELS = {
    5: "shape_predictor_5_face_landmarks.dat",
    68: "shape_predictor_68_face_landmarks.dat",
}
# Detector files of InsightFace's model packs, best first (buffalo_l, buffalo_m/s, antelopev2).
INSIGHTFACE_DETECTOR_NAMES = (
    "det_10g.onnx",
    "scrfd_10g_bnkps.onnx",
    "det_2.5g.onnx",
    "det_500m.onnx",
)
DEFAULT_DET_SIZE = 640
DEFAULT_DET_THRESH = 0.5
DLIB_MAX_SIDE = 1280  # HOG runs on a copy downscaled to this; landmarks use the full image


def _dlib5_face() -> np.ndarray:
    """dlib's 5 points on :data:`MEAN_FACE_3D` (head frame, mm, dlib's order): eye corners
    12.6 mm either side of the eye centres, outer ones 3.4 mm deeper and inner ones 3.4 mm
    shallower (a generic 68-point face's proportions); the nose base 12 mm below and 12 mm
    behind the nose tip (on frontal photos dlib's nose base lies 1.33x as far below the eyes
    as the 68-point model's nose tip, median of 16 photos)."""
    left, right = MEAN_FACE_3D[0], MEAN_FACE_3D[1]
    corners = [(right, 12.6, -3.4), (right, -12.6, 3.4), (left, -12.6, -3.4), (left, 12.6, 3.4)]
    pts = [eye + np.array([dx, 0.0, dz]) for eye, dx, dz in corners]
    return np.stack([*pts, np.array([0.0, -12.0, -12.0])])


#: dlib's 5-point model's points in the pose package's head frame (see :func:`_dlib5_face`).
DLIB5_FACE_3D = _dlib5_face()


class DetectorError(RuntimeError):
    """A detector cannot be built or run; the message says what to install or pass."""


@dataclass(frozen=True)
class DetectedFace:
    """One face: ``box`` (x1, y1, x2, y2), 5 ``landmarks`` [5, 2] (InsightFace order), score."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


class FaceDetector(Protocol):
    """What the commands need from a detector."""

    name: str

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]: ...


def largest_face(faces: Sequence[DetectedFace]) -> DetectedFace | None:
    """The face with the largest box (the original's choice for one-person photos)."""
    return max(faces, key=lambda f: f.area, default=None)


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(
            f"expected an RGB uint8 image [H, W, 3], got {image_rgb.dtype} {image_rgb.shape}"
        )
    return np.ascontiguousarray(image_rgb)


# --------------------------------------------------------------------------- InsightFace


def find_insightface_detector(face_models: str | Path) -> Path:
    """The SCRFD ONNX file in ``face_models`` (a model-pack folder, its parent, or the file)."""
    root = Path(face_models).expanduser()
    if root.is_file():
        if root.suffix != ".onnx":
            raise DetectorError(f"--face_models {root}: expected an .onnx file or a folder")
        return root
    if not root.is_dir():
        raise DetectorError(f"--face_models {root}: no such file or folder")
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    for name in INSIGHTFACE_DETECTOR_NAMES:
        for folder in folders:
            if (folder / name).is_file():
                return folder / name
    raise DetectorError(
        f"--face_models {root}: no InsightFace detector found; expected one of "
        f"{', '.join(INSIGHTFACE_DETECTOR_NAMES)} in it or in a sub-folder (e.g. unzip "
        "buffalo_l.zip there). Nothing is downloaded; or use --detector dlib."
    )


def onnx_providers(device: str) -> list[str]:
    """onnxruntime providers for ``device`` (cpu | cuda | auto); cuda must really be there."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise DetectorError(
            "--device cuda: onnxruntime has no CUDAExecutionProvider here (install the `gpu` "
            f"extra, onnxruntime-gpu, instead of onnxruntime); available: {available}"
        )
    if device in ("cuda", "auto") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class InsightFaceDetector:
    """SCRFD (InsightFace) from a local ONNX file; the original extraction's detector."""

    name = "insightface"

    def __init__(
        self,
        onnx_path: str | Path,
        device: str = "cpu",
        det_size: int = DEFAULT_DET_SIZE,
        det_thresh: float = DEFAULT_DET_THRESH,
    ) -> None:
        path = Path(onnx_path)
        if not path.is_file():
            raise DetectorError(f"InsightFace detector file not found: {path}")
        try:
            from insightface.model_zoo import get_model
        except ImportError as exc:
            raise DetectorError(
                "--detector insightface needs the insightface package "
                "(pip install --no-deps insightface==2.1)"
            ) from exc
        providers = onnx_providers(device)
        # A path ending in .onnx that exists is opened directly (download=False is the default).
        model = get_model(str(path), providers=providers, download=False)
        if model is None or getattr(model, "taskname", None) != "detection":
            raise DetectorError(f"{path} is not an InsightFace face detector (SCRFD)")
        ctx_id = 0 if providers[0] == "CUDAExecutionProvider" else -1
        model.prepare(ctx_id, input_size=(det_size, det_size), det_thresh=det_thresh)
        self.model, self.path = model, path

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        bgr = np.ascontiguousarray(_check_image(image_rgb)[:, :, ::-1])
        boxes, kpss = self.model.detect(bgr, max_num=0)
        if len(boxes) and kpss is None:
            raise DetectorError(f"{self.path} detects boxes without the 5 keypoints")
        return [
            DetectedFace(
                box=np.asarray(b[:4], np.float64),
                landmarks=np.asarray(k, np.float64).reshape(5, 2),
                score=float(b[4]),
            )
            for b, k in zip(boxes, kpss if kpss is not None else [], strict=False)
        ]


# --------------------------------------------------------------------------- dlib


def face_recognition_models_dir() -> Path:
    """Folder of the ``face-recognition-models`` data files, found without importing it.

    Importing the package runs ``from pkg_resources import resource_filename``, which fails on
    setuptools >= 81 (pkg_resources removed); only its data files are needed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorError(
            "--detector dlib needs the face-recognition-models package for its landmark model: "
            "pip install dlib-bin face-recognition-models"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def dlib5_to_insightface(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """dlib's 5 points in a ``width`` x ``height`` image -> InsightFace's 5 points.

    dlib's 5-point model gives, in image terms, the image-right eye's outer and inner corners
    (0, 1), the image-left eye's outer and inner corners (2, 3) and the nose base (4).  Eye
    centres are the corner midpoints (exact to a pixel or two).  The nose tip and the mouth
    corners are not observed: :data:`DLIB5_FACE_3D` is posed on the five points (the pose
    package's PnP and camera) and the mean face's nose tip and mouth corners are projected, so
    they move with the head in depth as a real nose and mouth do.  (Placing them in the 2D eye
    and nose-base basis instead put the mouth further sideways than the nose on turned faces:
    every fit read such faces as turned the other way.)  The nose tip's side is then the nose
    base's; pitch is an estimate (about 5 deg off); the 68-point model or InsightFace measure it.
    """
    from controlnet_ray.data.pose import fit_template

    p = np.asarray(points, np.float64).reshape(5, 2)
    rot, t = fit_template(p, width, height, DLIB5_FACE_3D, start_ypr=_dlib5_start(p))
    cam = head_to_camera(MEAN_FACE_3D[NOSE:], rot, t)
    projected = project(cam, width, height) if np.all(cam[:, 2] > 0) else np.full((3, 2), np.nan)
    return np.concatenate([p[2:4].mean(axis=0)[None], p[0:2].mean(axis=0)[None], projected])


def _dlib5_start(p: np.ndarray) -> tuple[float, float, float]:
    """A frontal-ish first guess for posing :data:`DLIB5_FACE_3D`: roll from the eye axis, yaw
    from the nose base's side (its depth in front of the eyes), pitch 0."""
    eyes = p[0:2].mean(axis=0) - p[2:4].mean(axis=0)
    iod = float(np.linalg.norm(eyes))
    side = float(np.dot(p[4] - 0.5 * (p[0:2].mean(axis=0) + p[2:4].mean(axis=0)), eyes)) / iod
    depth = float(np.mean(DLIB5_FACE_3D[:4, 2]) - DLIB5_FACE_3D[4, 2])  # < 0: base in front
    yaw = np.degrees(np.arcsin(np.clip(side / iod * 63.0 / -depth, -0.9, 0.9)))
    return float(yaw), 0.0, float(np.degrees(np.arctan2(-eyes[1], eyes[0])))


def dlib68_to_insightface(points: np.ndarray) -> np.ndarray:
    """iBUG 68 points -> InsightFace's 5: eye-contour means, nose tip (30), mouth corners."""
    p = np.asarray(points, np.float64).reshape(68, 2)
    return np.stack([p[36:42].mean(axis=0), p[42:48].mean(axis=0), p[30], p[48], p[54]])


class DlibDetector:
    """dlib HOG detector + shape predictor from face-recognition-models; offline."""

    name = "dlib"

    def __init__(self, landmarks: Literal[5, 68] = 5, upsample: int = 1) -> None:
        if landmarks not in DLIB_LANDMARK_MODELS:
            raise DetectorError(f"dlib landmarks must be 5 or 68, got {landmarks!r}")
        try:
            import dlib
        except ImportError as exc:
            raise DetectorError(
                "--detector dlib needs dlib: pip install dlib-bin face-recognition-models"
            ) from exc
        model = face_recognition_models_dir() / DLIB_LANDMARK_MODELS[landmarks]
        if not model.is_file():
            raise DetectorError(f"dlib landmark model missing: {model} (reinstall the package)")
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(model))
        self.landmarks = landmarks
        self.upsample = upsample
        self.name = f"dlib (HOG + {landmarks}-point landmarks)"

    def detect(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        img = _check_image(image_rgb)
        small, scale = _downscaled(img, DLIB_MAX_SIDE)
        rects, scores, _ = self._detector.run(small, self.upsample, 0.0)
        faces = []
        for rect, score in zip(rects, scores, strict=True):
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], np.float64)
            box /= scale
            full = self._dlib.rectangle(*(int(round(v)) for v in box))
            shape = self._predictor(img, full)
            pts = np.array([(q.x, q.y) for q in shape.parts()], np.float64)
            five = (
                dlib68_to_insightface(pts)
                if self.landmarks == 68
                else dlib5_to_insightface(pts, img.shape[1], img.shape[0])
            )
            if np.isfinite(five).all():  # else no head pose puts these points before the camera
                faces.append(DetectedFace(box=box, landmarks=five, score=float(score)))
        return faces


def _downscaled(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """A copy no larger than ``max_side`` (HOG time grows with pixels) and its scale factor."""
    import cv2

    scale = min(1.0, max_side / max(img.shape[:2]))
    if scale >= 1.0:
        return img, 1.0
    size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA), scale


# --------------------------------------------------------------------------- choice


def dlib_available() -> bool:
    """dlib and the face-recognition-models data are importable (without importing them)."""
    return all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models"))


def build_detector(
    kind: str = "auto",
    face_models: str | Path | None = None,
    device: str = "cpu",
    dlib_landmarks: Literal[5, 68] = 5,
) -> FaceDetector:
    """The detector ``kind`` names; ``auto`` = InsightFace when ``face_models`` is given, else dlib.

    ``auto`` never swaps a broken choice for another: a ``face_models`` path that holds no
    detector is an error, and with neither option available the error says what to pass.
    """
    if kind not in DETECTORS:
        raise DetectorError(f"--detector must be one of {', '.join(DETECTORS)}, got {kind!r}")
    if kind == "insightface" or (kind == "auto" and face_models is not None):
        if face_models is None:
            raise DetectorError(
                "--detector insightface needs --face_models DIR (a local InsightFace model "
                f"pack with one of {', '.join(INSIGHTFACE_DETECTOR_NAMES)}); nothing is "
                "downloaded"
            )
        return InsightFaceDetector(find_insightface_detector(face_models), device=device)
    if kind == "dlib" or dlib_available():
        return DlibDetector(landmarks=dlib_landmarks)
    raise DetectorError(
        "no face detector available: pass --face_models DIR (InsightFace model pack with "
        f"{INSIGHTFACE_DETECTOR_NAMES[0]}), or pip install dlib-bin face-recognition-models"
    )
