"""Rotations vectorised over images: Rodrigues vectors with their Jacobians, yaw/pitch/roll,
and projection of a head shape under many poses at once."""

from __future__ import annotations

import cv2
import numpy as np

from controlnet_ray.data.geometry import FLIP, rotation_from_ypr


def _skew(v: np.ndarray) -> np.ndarray:
    """[..., 3] -> [..., 3, 3] cross-product matrices."""
    out = np.zeros(v.shape[:-1] + (3, 3))
    out[..., 0, 1], out[..., 0, 2] = -v[..., 2], v[..., 1]
    out[..., 1, 0], out[..., 1, 2] = v[..., 2], -v[..., 0]
    out[..., 2, 0], out[..., 2, 1] = -v[..., 1], v[..., 0]
    return out


def _rodrigues_with_jac(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation matrices [K,3,3] and right Jacobians J_r [K,3,3] of Rodrigues vectors [K,3].

    d(R(r) p)/dr = -R [p]_x J_r(r).
    """
    th2 = np.sum(r * r, axis=-1)
    th = np.sqrt(th2)
    small = th < 1e-4
    ths = np.where(small, 1.0, th)
    a = np.where(small, 1.0 - th2 / 6.0, np.sin(ths) / ths)  # sin t / t
    b = np.where(small, 0.5 - th2 / 24.0, (1.0 - np.cos(ths)) / ths**2)  # (1 - cos t) / t^2
    c = np.where(small, 1.0 / 6.0 - th2 / 120.0, (ths - np.sin(ths)) / ths**3)  # (t - sin t)/t^3
    k = _skew(r)
    k2 = k @ k
    eye = np.eye(3)
    rot = eye + a[:, None, None] * k + b[:, None, None] * k2
    jr = eye - b[:, None, None] * k + c[:, None, None] * k2
    return rot, jr


def _rotvec_from_matrix(rot: np.ndarray) -> np.ndarray:
    return np.array([cv2.Rodrigues(np.ascontiguousarray(m))[0].ravel() for m in rot]).reshape(-1, 3)


def _ypr_batch(rot: np.ndarray) -> np.ndarray:
    """Vectorised geometry.ypr_from_rotation: [K,3,3] -> [K,3] degrees."""
    pitch = np.degrees(np.arcsin(np.clip(-rot[:, 2, 1], -1.0, 1.0)))
    yaw = np.degrees(np.arctan2(-rot[:, 2, 0], rot[:, 2, 2]))
    roll = np.degrees(np.arctan2(-rot[:, 0, 1], rot[:, 1, 1]))
    return np.stack([yaw, pitch, roll], axis=1)


def _rot_from_ypr_batch(ypr: np.ndarray) -> np.ndarray:
    return np.stack([rotation_from_ypr(*map(float, p)) for p in np.asarray(ypr).reshape(-1, 3)])


def _project_batch(shape: np.ndarray, rot: np.ndarray, trans: np.ndarray, sizes: np.ndarray):
    """Landmarks [K,5,2] of a head shape [5,3] (or [K,5,3]) seen with poses (rot, trans)."""
    pts = np.einsum("kij,k...j->k...i", rot, np.broadcast_to(shape, (rot.shape[0], 5, 3)))
    cam = pts * np.diag(FLIP) + trans[:, None, :]
    f = sizes[:, 0][:, None]
    u = f * cam[..., 0] / cam[..., 2] + sizes[:, 0][:, None] / 2.0
    v = f * cam[..., 1] / cam[..., 2] + sizes[:, 1][:, None] / 2.0
    return np.stack([u, v], axis=-1)
