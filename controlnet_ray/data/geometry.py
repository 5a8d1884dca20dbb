"""Head-pose conventions and camera geometry, the single source of truth for angles.

Convention (used everywhere: data, model inputs, CLIs, TensorBoard):
head frame with x to the viewer's right, y up, z towards the viewer; the head's rotation is
``R = Rz(roll) @ Rx(-pitch) @ Ry(yaw)``; zero means facing the camera upright.
yaw > 0 turns the nose towards the image's right, pitch > 0 lifts the nose,
roll > 0 tilts the head counter-clockwise in the image. Angles are degrees.

Camera: OpenCV pinhole (x right, y down, z forward, away from the viewer), focal length
equal to the image width and principal point at the image centre, as the original
extraction script assumed. A head-frame point p maps to camera coordinates
``FLIP @ (R @ p) + t`` with ``FLIP = diag(1, -1, -1)``.
"""

from __future__ import annotations

import numpy as np

FLIP = np.diag([1.0, -1.0, -1.0])

#: The poses a model accepts at all (the pose head's scale): inference refuses others, and
#: preparation reports frames beyond them.
POSE_LIMITS_DEG = {"yaw": 90.0, "pitch": 60.0, "roll": 60.0}

# The original script's 5-point 3D template (head frame, y up, millimetre-like units):
# left eye, right eye, nose tip, left mouth corner, right mouth corner.
# "left"/"right" are image-left/image-right for a frontal face, matching InsightFace's order.
LEGACY_TEMPLATE_3D = np.array(
    [
        [-36.0, 13.0, -42.0],
        [36.0, 13.0, -42.0],
        [0.0, 0.0, 0.0],
        [-25.0, -30.0, -42.0],
        [25.0, -30.0, -42.0],
    ],
    dtype=np.float64,
)

# InsightFace's ArcFace 5-point template for a 112x112 aligned crop (same order as above).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def _rx(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def _ry(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def _rz(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def rotation_from_ypr(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation R = Rz(roll) Rx(-pitch) Ry(yaw) in the head frame (see module doc)."""
    return _rz(roll) @ _rx(-pitch) @ _ry(yaw)


def ypr_from_rotation(rot: np.ndarray) -> tuple[float, float, float]:
    """Inverse of rotation_from_ypr (unique for |pitch| < 90 degrees)."""
    # R = Rz(r) Rx(-p) Ry(y) gives R[2] = (-cos p sin y, -sin p, cos p cos y) and
    # R[:, 1] = (-sin r cos p, cos r cos p, -sin p).
    sp = float(np.clip(-rot[2, 1], -1.0, 1.0))
    pitch = np.degrees(np.arcsin(sp))
    yaw = np.degrees(np.arctan2(-rot[2, 0], rot[2, 2]))
    roll = np.degrees(np.arctan2(-rot[0, 1], rot[1, 1]))
    return float(yaw), float(pitch), float(roll)


def head_to_camera(points: np.ndarray, rot: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """Map head-frame points [N,3] to OpenCV camera coordinates [N,3]."""
    return (FLIP @ (rot @ points.T)).T + np.asarray(trans, dtype=np.float64)[None, :]


def camera_matrix(width: float, height: float) -> np.ndarray:
    """The original's intrinsics: focal length = image width, principal point at the centre."""
    return np.array(
        [[width, 0.0, width / 2.0], [0.0, width, height / 2.0], [0.0, 0.0, 1.0]], dtype=np.float64
    )


def project(points_cam: np.ndarray, width: float, height: float) -> np.ndarray:
    """Pinhole projection of camera-frame points [N,3] to pixels [N,2]."""
    k = camera_matrix(width, height)
    uvw = (k @ points_cam.T).T
    return uvw[:, :2] / uvw[:, 2:3]
