"""The 2D evidence of a yaw's sign: which side of the face's vertical axis the nose tip lies on.

For any real head, turning the nose towards the image's right (yaw > 0) moves the nose tip to
the right of the line from the eyes' midpoint to the mouth's, measured across that line (so roll
does not matter, nor the eyes' order, which reverses near profile with pitch and roll). The
offset needs no 3D model, so it catches what a fit can get wrong: a depth-inverted solution
(the mirror image of the right one under near-orthographic viewing) has the opposite yaw.

A fit is said to contradict the nose only when the offset along the eye axis (steadier on
real talking heads, whose mouth corners move as they speak) disagrees too. Calibrated by
``tests/test_pose.py`` on exact projections of several face templates over yaw +-90, pitch and
roll +-45 and focal lengths 0.5x-3x the image width: the true yaw contradicts the nose's side
in under 0.2 % of views (small yaws at the extremes of pitch and roll together), which is why a
person is refitted only when most of their clearly turned images disagree.
"""

from __future__ import annotations

import numpy as np

from controlnet_ray.data.pose.mean_face import NOSE

#: Nose offsets (eye-to-mouth distances) beyond which a face is clearly turned: about 20 deg of
#: yaw for an average face, well above the detector noise and the asymmetry of real faces.
CLEAR_TURN = 0.15
#: Yaws (degrees) that count as a real turn: the sign of smaller fitted yaws is not checked
#: (with strong pitch and roll together a small yaw can put the nose on either side).
MIN_CHECKED_YAW = 15.0


def nose_offset(landmarks_2d: np.ndarray) -> np.ndarray:
    """[..., 5, 2] InsightFace-order landmarks -> [...] signed offset of the nose tip across
    the face's vertical axis (eyes' midpoint to mouth corners' midpoint), in eye-to-mouth
    distances (> 0: towards the image's right for an upright face)."""
    lm = np.asarray(landmarks_2d, np.float64)
    eye_mid = 0.5 * (lm[..., 0, :] + lm[..., 1, :])
    down = 0.5 * (lm[..., 3, :] + lm[..., 4, :]) - eye_mid
    rel = lm[..., NOSE, :] - eye_mid
    across = rel[..., 0] * down[..., 1] - rel[..., 1] * down[..., 0]
    return across / np.maximum(np.sum(down * down, axis=-1), 1e-12)


def nose_offset_along_eyes(landmarks_2d: np.ndarray) -> np.ndarray:
    """[...] signed offset of the nose tip from the eyes' midpoint along the eye axis, in
    inter-ocular distances: steadier than :func:`nose_offset` on real talking heads (a
    speaking mouth moves its corners), wrong near profile with pitch and roll (the eyes'
    order reverses there, and with it the axis)."""
    lm = np.asarray(landmarks_2d, np.float64)
    eyes = lm[..., 1, :] - lm[..., 0, :]
    rel = lm[..., NOSE, :] - 0.5 * (lm[..., 0, :] + lm[..., 1, :])
    return np.sum(rel * eyes, axis=-1) / np.maximum(np.sum(eyes * eyes, axis=-1), 1e-12)


def yaw_contradicts(yaw_deg: np.ndarray, landmarks_2d: np.ndarray) -> np.ndarray:
    """[...] bool: a clearly turned face whose fitted yaw has the sign opposite to its nose's
    side by both measures (across the face's vertical axis and along the eye axis; each alone
    errs where the other holds: near profile, a speaking mouth)."""
    yaw = np.asarray(yaw_deg, np.float64)
    across, along = nose_offset(landmarks_2d), nose_offset_along_eyes(landmarks_2d)
    turned = (np.abs(across) >= CLEAR_TURN) & (np.abs(yaw) >= MIN_CHECKED_YAW)
    return turned & (across * yaw < 0) & (along * yaw < 0)
