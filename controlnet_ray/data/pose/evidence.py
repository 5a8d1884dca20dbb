"""The 2D evidence of a yaw's sign: which side of the eyes' midpoint the nose tip lies on.

For any real head, turning the nose towards the image's right (yaw > 0) moves the nose tip to
the right of the eyes' midpoint, measured along the eye axis (so roll does not matter). The
offset needs no 3D model, so it catches what a fit can get wrong: a depth-inverted solution
(the mirror image of the right one under near-orthographic viewing) has the opposite yaw.
"""

from __future__ import annotations

import numpy as np

from controlnet_ray.data.pose.mean_face import NOSE

#: Nose offsets (inter-ocular distances) beyond which a face is clearly turned: about 15 deg
#: of yaw for an average face (nose tip 30 mm in front of eyes 63 mm apart), well above the
#: detector noise and the asymmetry of real faces.
CLEAR_TURN = 0.12
#: Yaws (degrees) that count as a real turn: the sign of smaller fitted yaws is not checked.
MIN_CHECKED_YAW = 5.0


def nose_offset(landmarks_2d: np.ndarray) -> np.ndarray:
    """[..., 5, 2] InsightFace-order landmarks -> [...] signed offset of the nose tip from the
    eyes' midpoint along the eye axis, in inter-ocular distances (> 0: towards image right)."""
    lm = np.asarray(landmarks_2d, np.float64)
    eyes = lm[..., 1, :] - lm[..., 0, :]
    rel = lm[..., NOSE, :] - 0.5 * (lm[..., 0, :] + lm[..., 1, :])
    return np.sum(rel * eyes, axis=-1) / np.maximum(np.sum(eyes * eyes, axis=-1), 1e-12)


def yaw_contradicts(yaw_deg: np.ndarray, landmarks_2d: np.ndarray) -> np.ndarray:
    """[...] bool: a clearly turned face whose fitted yaw has the sign opposite to its nose's
    side (yaw > 0 must have the nose right of the eyes' midpoint)."""
    off = nose_offset(landmarks_2d)
    yaw = np.asarray(yaw_deg, np.float64)
    return (np.abs(off) >= CLEAR_TURN) & (np.abs(yaw) >= MIN_CHECKED_YAW) & (off * yaw < 0)
