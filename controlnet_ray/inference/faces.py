"""From an image to an aligned crop and its source pose: aligned crops pass through; photos
are detected (or given 5 landmarks) and framed exactly as the training data were."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from controlnet_ray.inference.errors import InferenceError

if TYPE_CHECKING:
    from controlnet_ray.data.detect import FaceDetector
    from controlnet_ray.data.pose import PhotoPoseModel


def parse_landmarks(text: str) -> np.ndarray:
    """``x1,y1,...,x5,y5`` (InsightFace order) -> [5, 2] float64."""
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) != 10 or not all(map(math.isfinite, values)):
        raise InferenceError(
            f"--landmarks {text!r}: expected 10 numbers x1,y1,...,x5,y5 (left eye, right eye, "
            "nose tip, left mouth corner, right mouth corner; image-left/right, pixels)"
        )
    return np.asarray(values, np.float64).reshape(5, 2)


@dataclass
class PreparedFace:
    """An aligned crop ready for the model, and where its source pose came from."""

    crop: np.ndarray  # RGB uint8 [S, S, 3]
    source_pose: tuple[float, float, float]
    pose_origin: str
    landmarks: np.ndarray | None = None  # [5, 2] in the original image, for photos


def prepare_face(
    image: np.ndarray,
    image_size: int,
    *,
    name: str,
    aligned: bool = False,
    landmarks: np.ndarray | None = None,
    source_pose: Sequence[float | None] = (None, None, None),
    detector: Callable[[], FaceDetector] | None = None,
    framing: str,
    pose_model: PhotoPoseModel | None = None,
) -> PreparedFace:
    """Aligned crop + source pose of one image (see the package docstring for the rules).

    ``source_pose`` entries that are not None override the estimate (or the 0 default of
    aligned crops) axis by axis.  ``detector`` is a factory so detectors load only when needed.
    ``pose_model`` estimates a photo's pose and frames its head as the model's training data
    were (the runner's; None: :meth:`PhotoPoseModel.default`).
    """
    h, w = image.shape[:2]
    if landmarks is None and (aligned or (h, w) == (image_size, image_size)):
        crop = image if (h, w) == (image_size, image_size) else _resize(image, image_size)
        pose = tuple(0.0 if v is None else float(v) for v in source_pose)
        origin = "aligned crop: --source_yaw/--source_pitch/--source_roll (default 0)"
        return PreparedFace(crop, pose, origin)  # type: ignore[arg-type]
    if landmarks is None:
        landmarks = _detect_landmarks(image, name, detector)
        how = "detected landmarks"
    else:
        how = "--landmarks"
    face = _align_photo(image, image_size, landmarks, source_pose, how, framing, pose_model)
    if face is None:
        raise InferenceError(f"{name}: no head pose fits the {how}")
    return face


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def _detect_landmarks(
    image: np.ndarray, name: str, detector: Callable[[], FaceDetector] | None
) -> np.ndarray:
    from controlnet_ray.data.detect import largest_face

    if detector is None:
        raise InferenceError(
            f"{name} is a {image.shape[1]}x{image.shape[0]} photo, not an aligned crop, and no "
            "face detector is available: pass --landmarks x1,y1,...,x5,y5, or --aligned if it "
            "is a crop, or --face_models DIR / pip install dlib-bin face-recognition-models"
        )
    face = largest_face(detector().detect(image))
    if face is None:
        raise InferenceError(
            f"{name}: no face found; pass --landmarks x1,y1,...,x5,y5 (or --aligned for a crop)"
        )
    return face.landmarks


def _align_photo(
    image: np.ndarray,
    image_size: int,
    landmarks: np.ndarray,
    source_pose: Sequence[float | None],
    how: str,
    framing: str,
    pose_model: PhotoPoseModel | None,
) -> PreparedFace | None:
    """The photo aligned and its pose estimated; None when no head pose fits the landmarks."""
    from controlnet_ray.data.align import align_face, crop, head_crop_matrix
    from controlnet_ray.data.pose import PhotoPoseModel, PoseFitError

    h, w = image.shape[:2]
    model = pose_model or PhotoPoseModel.default()
    try:
        estimate = model.estimate(landmarks, w, h)
    except PoseFitError:
        return None
    pose = tuple(
        float(e) if v is None else float(v) for e, v in zip(estimate, source_pose, strict=True)
    )
    overridden = any(v is not None for v in source_pose)
    origin = f"estimated from {how} (data.pose single-image estimate)" + (
        ", partly overridden by --source_*" if overridden else ""
    )
    if framing == "head":  # framed like the training data: on the head, from the pose
        matrix = head_crop_matrix(landmarks, estimate, w, h, model.mean_face, image_size)
        face = crop(image, matrix, image_size)
    else:
        face = align_face(image, landmarks, image_size)
    return PreparedFace(face, pose, origin, np.asarray(landmarks, np.float64))  # type: ignore[arg-type]
