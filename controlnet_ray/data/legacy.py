"""What the original extraction script computed per image, reproduced exactly.

The original fitted the 5-point template ``geometry.LEGACY_TEMPLATE_3D`` (y up) to the
InsightFace landmarks with OpenCV EPnP under its y-down camera (focal length = image width,
principal point at the centre, no distortion), kept ``lm3d = R @ M + t`` (camera frame) and
stored Euler angles read off ``R`` as ``(atan2(R10, R00), atan2(-R20, sy), atan2(R21, R22))``
in degrees. Because the template is y-up and the camera y-down, those angles are permuted and
wrapped (the third is near +-180 degrees for a frontal face): they are *not* yaw/pitch/roll in
``geometry``'s convention. This module exists so that ``layout.write_legacy_dataset`` produces
files indistinguishable from the original's; training never uses these angles (poses come from
``controlnet_ray.data.pose``).

Inputs are cast to float32 like the original's (InsightFace emits float32 landmarks and the
template and camera matrix were float32 arrays), so EPnP sees the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from controlnet_ray.data.geometry import LEGACY_TEMPLATE_3D


class LegacyFitError(ValueError):
    """OpenCV could not fit the template to these landmarks (the original skipped such images)."""


@dataclass(frozen=True)
class LegacyFit:
    """One image's PnP result in the original's terms."""

    rotation: np.ndarray  # [3,3] float64, camera-from-template
    translation: np.ndarray  # [3] float64
    landmarks_3d: np.ndarray  # [5,3] float64, R @ M + t (the JSON's landmarks_3d_original)
    euler_deg: np.ndarray  # [3] float64, the JSON's "poses" entry


def legacy_camera_matrix(width: float, height: float) -> np.ndarray:
    """The original's float32 intrinsics (f = width, principal point at the centre)."""
    return np.array(
        [[width, 0, width / 2.0], [0, width, height / 2.0], [0, 0, 1]], dtype=np.float32
    )


def legacy_euler_deg(rot: np.ndarray) -> np.ndarray:
    """The original's Euler extraction, including its gimbal-lock branch, in degrees."""
    sy = math.sqrt(rot[0, 0] * rot[0, 0] + rot[1, 0] * rot[1, 0])
    if sy >= 1e-6:
        a = math.atan2(rot[1, 0], rot[0, 0])
        b = math.atan2(-rot[2, 0], sy)
        c = math.atan2(rot[2, 1], rot[2, 2])
    else:
        a = math.atan2(-rot[0, 1], rot[1, 1])
        b = math.atan2(-rot[2, 0], sy)
        c = 0.0
    return np.degrees(np.array([a, b, c], dtype=np.float64))


def legacy_fit(landmarks_2d: np.ndarray, image_size: tuple[int, int]) -> LegacyFit:
    """EPnP fit of the legacy template; UPnP when EPnP raises, as the original did."""
    width, height = float(image_size[0]), float(image_size[1])
    model = LEGACY_TEMPLATE_3D.astype(np.float32)
    points = np.ascontiguousarray(np.asarray(landmarks_2d, dtype=np.float32).reshape(5, 2))
    cam = legacy_camera_matrix(width, height)
    dist = np.zeros((4, 1), dtype=np.float32)
    try:
        ok, rvec, tvec = cv2.solvePnP(model, points, cam, dist, flags=cv2.SOLVEPNP_EPNP)
    except cv2.error:
        try:
            ok, rvec, tvec = cv2.solvePnP(model, points, cam, dist, flags=cv2.SOLVEPNP_UPNP)
        except cv2.error as exc:
            raise LegacyFitError(f"PnP failed for landmarks {points.tolist()}: {exc}") from exc
    if not ok:
        raise LegacyFitError(f"PnP did not converge for landmarks {points.tolist()}")
    rot, _ = cv2.Rodrigues(rvec)
    lm3d = (rot @ model.T.astype(np.float64) + tvec.reshape(3, 1)).T
    return LegacyFit(rot, tvec.reshape(3).astype(np.float64), lm3d, legacy_euler_deg(rot))


def compute_standard_info(front_landmarks_3d: np.ndarray, note: str = "") -> dict[str, Any]:
    """The original's ``standard_info`` from all front photos' ``landmarks_3d_original``.

    mean_landmarks = per-point mean over fronts [5,3]; standard_center = centroid of those;
    standard_scale = 1 / (largest distance of a mean landmark from that centroid + 1e-8), i.e.
    the standardised mean face fits the unit ball. PnP output is in template units, so the scale
    is set by the template (max radius 41.9 for a frontal face -> 0.0239) and grows slightly as
    averaging over varied poses shrinks the mean face (about 0.0243 for typical photo sets).
    """
    lm = np.asarray(front_landmarks_3d, dtype=np.float64).reshape(-1, 5, 3)
    if len(lm) == 0:
        raise ValueError("standard_info needs at least one front image")
    mean_landmarks = lm.mean(axis=0)
    center = mean_landmarks.mean(axis=0)
    standard = mean_landmarks - center
    scale = 1.0 / (float(np.linalg.norm(standard, axis=1).max()) + 1e-8)
    return {
        "standard_center": center.tolist(),
        "standard_scale": scale,
        "standard_landmarks": standard.tolist(),
        "mean_landmarks": mean_landmarks.tolist(),
        "num_samples": int(len(lm)),
        "note": note
        or "keypoints = (landmarks_3d - center) * standard_scale; scale = 1/max radius of the "
        "mean front landmarks",
    }


def legacy_keypoints(
    landmarks_3d: np.ndarray, standard_scale: float, center: np.ndarray | None = None
) -> np.ndarray:
    """Normalised keypoints [..., 5, 3] float64: (lm3d - center) * standard_scale.

    ``center=None`` centres each image on its own landmark mean; pass ``standard_center`` to
    subtract the dataset-wide centre instead.
    """
    lm = np.asarray(landmarks_3d, dtype=np.float64)
    ctr = lm.mean(axis=-2, keepdims=True) if center is None else np.asarray(center, np.float64)
    return (lm - ctr) * float(standard_scale)
