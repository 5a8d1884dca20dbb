"""ArcFace-style 5-point face alignment, delegated to InsightFace's own implementation.

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
from insightface.utils import face_align

from controlnet_ray.data.geometry import ARCFACE_TEMPLATE_112


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
    with warnings.catch_warnings():
        # scikit-image >= 0.26 deprecates the estimate() call InsightFace makes; harmless here.
        warnings.simplefilter("ignore", FutureWarning)
        matrix = np.asarray(face_align.estimate_norm(lmk, image_size=size), dtype=np.float64)
    if size != image_size:
        matrix = matrix * (float(image_size) / size)
    return matrix


def align_face(image: np.ndarray, landmarks_2d: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Aligned ``image_size`` x ``image_size`` crop, same channel order as ``image`` (BGR or RGB).

    Pixels outside the source are black, as in ``face_align.norm_crop``.
    """
    matrix = alignment_matrix(landmarks_2d, image_size)
    return cv2.warpAffine(image, matrix, (image_size, image_size), borderValue=0.0)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to points [N,2] (for checks and visualisation)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]
