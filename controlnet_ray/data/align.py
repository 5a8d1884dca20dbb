"""Crop framing: ArcFace-style 5-point alignment (InsightFace's own implementation) and a
head-centred framing from the fitted 3D pose.

The crops must match what InsightFace-trained identity encoders expect, so the similarity
transform comes from ``insightface.utils.face_align.estimate_norm`` rather than a rewrite.
InsightFace only supports sizes that are multiples of 112 or 128, and its 128 mode shifts the
template sideways instead of scaling it. To frame the face identically at every ``image_size``,
sizes that are not multiples of 112 use the 112 estimate scaled by ``image_size / 112``: the
least-squares similarity to a scaled template is exactly the scaled similarity, so this is the
transform InsightFace would compute for a uniformly scaled template.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np

from controlnet_ray.config import FRAMINGS as FRAMINGS  # the one list (config.Framing)
from controlnet_ray.data.geometry import ARCFACE_TEMPLATE_112, FLIP, rotation_from_ypr


def arcface_template(image_size: int) -> np.ndarray:
    """The 5-point target positions [5,2] for an ``image_size`` crop (112 template scaled)."""
    return ARCFACE_TEMPLATE_112 * (float(image_size) / 112.0)


def alignment_matrix(landmarks_2d: np.ndarray, image_size: int) -> np.ndarray:
    """2x3 similarity mapping source-image landmarks onto ``arcface_template(image_size)``."""
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    lmk = np.asarray(landmarks_2d, dtype=np.float64).reshape(5, 2)
    if not np.isfinite(lmk).all():
        raise ValueError(f"landmarks must be finite, got {lmk.tolist()}")
    size = image_size if image_size % 112 == 0 else 112
    # Imported here, not at module load: the training driver imports this module (through
    # data.shards) but only preparing shards aligns faces, so a job whose shards are cached
    # runs without insightface installed.
    try:
        from insightface.utils import face_align
    except ImportError as exc:
        raise ImportError(
            "--framing arcface needs the insightface package (pip install --no-deps "
            "insightface==2.1); --framing head (the default) does not"
        ) from exc

    with warnings.catch_warnings():
        # scikit-image >= 0.26 deprecates the estimate() call InsightFace makes; harmless here.
        warnings.simplefilter("ignore", FutureWarning)
        matrix = np.asarray(face_align.estimate_norm(lmk, image_size=size), dtype=np.float64)
    if size != image_size:
        matrix = matrix * (float(image_size) / size)
    return matrix


def align_face(image: np.ndarray, landmarks_2d: np.ndarray, image_size: int) -> np.ndarray:
    """Aligned ``image_size`` x ``image_size`` crop, same channel order as ``image`` (BGR or RGB).

    Pixels outside the source are black, as in ``face_align.norm_crop``.
    """
    matrix = alignment_matrix(landmarks_2d, image_size)
    return cv2.warpAffine(image, matrix, (image_size, image_size), borderValue=0.0)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to points [N,2] (for checks and visualisation)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


# ------------------------------------------------------------------------------ head framing

#: Point of the head the crop is centred on: head frame of the pose estimator's mean face
#: (nose tip at the origin, mm at a 63 mm inter-ocular distance, y up, z towards the viewer):
#: about eye level, 95 mm behind the nose tip -- near the middle of the skull, so the head
#: turns about the crop's centre.
HEAD_CENTER_MM = np.array([0.0, 25.0, -95.0])
#: Half the crop's side at the head centre's depth: fits the whole head (chin to the top of
#: the hair, nose tip to the back of the head at profile) with a small margin.
HEAD_HALF_SIZE_MM = 140.0


def head_translation(
    landmarks_2d: np.ndarray, rotation: np.ndarray, width: float, height: float, shape: np.ndarray
) -> np.ndarray:
    """Camera translation t of a head of known rotation from its five landmarks.

    With the rotation fixed, the pinhole projection of ``shape`` (``cam = FLIP R p + t``, focal
    length = width, principal point at the centre) is linear in t once multiplied out by the
    depth, so t is an ordinary least-squares solution over the ten coordinates: no iteration,
    no failure mode besides degenerate landmarks (which the reader rejects).
    """
    lm = np.asarray(landmarks_2d, dtype=np.float64).reshape(5, 2)
    q = (FLIP @ (np.asarray(rotation, dtype=np.float64) @ np.asarray(shape, np.float64).T)).T
    f, cx, cy = float(width), float(width) / 2.0, float(height) / 2.0
    du, dv = lm[:, 0] - cx, lm[:, 1] - cy
    zeros, ones = np.zeros(5), np.ones(5)
    a = np.concatenate(
        [np.stack([-f * ones, zeros, du], 1), np.stack([zeros, -f * ones, dv], 1)], axis=0
    )
    b = np.concatenate([f * q[:, 0] - du * q[:, 2], f * q[:, 1] - dv * q[:, 2]])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def head_crop_matrix(
    landmarks_2d: np.ndarray,
    pose_deg: np.ndarray,
    width: float,
    height: float,
    shape: np.ndarray,
    image_size: int,
) -> np.ndarray:
    """2x3 affine (scale + shift, no rotation) framing the head at the same place and size at
    every pose: centred on the projected head centre, side = 2 ``HEAD_HALF_SIZE_MM`` at its
    depth.  Roll stays in the image (the generator is asked to render it); ArcFace alignment
    instead de-rolls and frames the *face*, which puts a profile head at the crop border."""
    rot = rotation_from_ypr(*map(float, np.asarray(pose_deg).reshape(3)))
    t = head_translation(landmarks_2d, rot, width, height, shape)
    centre = FLIP @ (rot @ HEAD_CENTER_MM) + t
    if not centre[2] > 0:
        raise ValueError(f"head centre behind the camera (depth {centre[2]:.1f})")
    u = float(width) * centre[0] / centre[2] + float(width) / 2.0
    v = float(width) * centre[1] / centre[2] + float(height) / 2.0
    half = float(width) * HEAD_HALF_SIZE_MM / centre[2]
    k = image_size / (2.0 * half)
    return np.array([[k, 0.0, image_size / 2.0 - k * u], [0.0, k, image_size / 2.0 - k * v]])


def crop_inside_fraction(matrix: np.ndarray, width: float, height: float, image_size: int) -> float:
    """Fraction of an axis-aligned crop (``head_crop_matrix``) that lies inside the source."""
    k, u0, v0 = matrix[0, 0], -matrix[0, 2] / matrix[0, 0], -matrix[1, 2] / matrix[1, 1]
    side = image_size / k
    ix = max(0.0, min(u0 + side, float(width)) - max(u0, 0.0))
    iy = max(0.0, min(v0 + side, float(height)) - max(v0, 0.0))
    return ix * iy / (side * side)


def crop(image: np.ndarray, matrix: np.ndarray, image_size: int) -> np.ndarray:
    """``image`` warped by a 2x3 ``matrix`` to ``image_size`` square; black outside the source."""
    scale = float(np.sqrt(abs(np.linalg.det(np.asarray(matrix)[:, :2]))))
    if scale < 0.8:  # shrinking: low-pass first, or the crop aliases (warpAffine has no area mode)
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=0.45 / scale)
    return cv2.warpAffine(image, matrix, (image_size, image_size), borderValue=0.0)
