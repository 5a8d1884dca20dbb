"""Head pose (yaw, pitch, roll) from the legacy data's five 2D landmarks.

The legacy extraction script gives, per image, five landmarks (image-left eye, image-right eye,
nose tip, image-left mouth corner, image-right mouth corner, InsightFace order) and the image
size; its pose values are unusable.  Angles and camera follow :mod:`controlnet_ray.data.geometry`
(focal length = image width, principal point at the centre, ``cam = FLIP @ R @ p + t``).

Three estimators, from worst to best:

* :func:`legacy_epnp_pose` -- the original's EPnP on ``LEGACY_TEMPLATE_3D`` (comparison only).
* :func:`estimate_pose_generic` -- iterative PnP (SQPnP start, Levenberg-Marquardt refinement)
  with a *mean* face.  A single image cannot separate a person's geometry from their pose, so
  this is off by the person's deviation from the mean face (and biased when the mean is wrong).
* :func:`fit_person` -- a small bundle adjustment: one person's 5-point 3D shape jointly with
  the poses of all their images (``scipy.optimize.least_squares``, Rodrigues vectors, analytic
  Jacobian, soft-L1 loss on the landmark residuals only).  Pose and shape are only defined up to
  a rotation (the gauge); it is fixed by priors, all Gaussian:

  - *mirror symmetry* of the shape (eye and mouth-corner pairs mirror about a vertical plane
    through the nose): fixes yaw and roll of the head frame to a fraction of a degree;
  - *shape prior* around the mean face (centred coordinates, sigma 3.5 mm each at a 63 mm
    inter-ocular distance): the only thing besides the front photos that fixes pitch --
    ``pitch = 0`` means "the face looks like the mean face seen from the front";
  - *front photos* (role ``front``) a few degrees around frontal (sigma 3 deg yaw/pitch, 2 deg
    roll) -- a prior, not a hard ``front = 0`` constraint, since ID photos are a few degrees off.
    A front photo fitted more than 4 sigma off frontal (mislabelled) loses its prior and the
    person is refitted; a person whose images are mostly "front" gets no frontal prior.

  Scale and depth are ambiguous under perspective; the shape prior fixes the scale (the mean
  face's), which leaves the angles untouched.

:func:`estimate_dataset_poses` runs the whole legacy dataset: pass 1 bundle-adjusts up to 150
persons around :data:`MEAN_FACE_3D`; the dataset's own mean face is the median of those shapes,
each expressed in its person's *front-photo* frame (so the population's pitch zero is "ID photos
are frontal on average", which no longer depends on the guessed mean face); pass 2 fits
everyone around that mean.  Persons with too few images get the generic estimate with the
dataset mean face, corrected by the median (bundle - generic) offset measured on the
bundle-adjusted persons; the report lists them.

The solver is a variable projection: ``least_squares`` sees only the 12 shape parameters and
the per-image poses are solved inside, vectorised over the images (see :class:`_Bundle`);
about 20-35 ms of CPU per person of 25 images, both passes included.

The last section, :func:`synthesize_landmark_set`, makes a 5-point synthetic test set (identity-
dependent geometry, off-frontal front photos, smooth video trajectories, pixel noise) with the
true poses, for the tests and ``benchmarks/pose_accuracy.py``.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy.optimize import least_squares

from controlnet_ray.data.geometry import (
    ARCFACE_TEMPLATE_112,
    FLIP,
    LEGACY_TEMPLATE_3D,
    camera_matrix,
    head_to_camera,
    project,
    rotation_from_ypr,
    ypr_from_rotation,
)

__all__ = [
    "MEAN_FACE_3D",
    "BundleConfig",
    "PersonFit",
    "PoseReport",
    "SyntheticLandmarkSet",
    "estimate_dataset_poses",
    "estimate_pose_generic",
    "estimate_poses_generic",
    "fit_person",
    "legacy_epnp_pose",
    "mean_face_from_fits",
    "pose_errors",
    "synthesize_landmark_set",
]

NOSE = 2
_PAIRS = ((0, 1), (3, 4))  # (image-left, image-right) eyes, mouth corners
_FREE_POINTS = (0, 1, 3, 4)  # the nose tip is the head-frame origin


def _build_mean_face() -> np.ndarray:
    """Default mean face (head frame, mm, nose tip at the origin), see MEAN_FACE_3D."""
    t = ARCFACE_TEMPLATE_112
    xy = np.stack([t[:, 0] - t[NOSE, 0], -(t[:, 1] - t[NOSE, 1])], axis=1)  # y up
    xy = 0.5 * (xy + xy[[1, 0, 2, 4, 3]] * np.array([-1.0, 1.0]))  # mirror-symmetrise
    xy[NOSE] = 0.0
    xy *= 63.0 / (xy[1, 0] - xy[0, 0])  # inter-ocular (pupil) distance 63 mm
    z = np.array([-30.0, -30.0, 0.0, -27.0, -27.0])  # pupils / mouth corners behind the nose tip
    return np.column_stack([xy, z])


#: Default mean face.  Its frontal (orthographic) view is exactly InsightFace's ArcFace 5-point
#: layout -- the average of frontal faces -- scaled to a 63 mm inter-ocular distance, so that a
#: frontal average face gets pitch 0; depths (pupils 30 mm, mouth corners 27 mm behind the nose
#: tip) are anthropometric estimates.  The legacy template instead puts the nose 13 mm below the
#: eyes (real faces: ~36 mm), which biases pitch.  Only a starting point: the dataset pass
#: replaces it with the mean of the bundle-adjusted shapes.
MEAN_FACE_3D = _build_mean_face()


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _as_landmarks(value: Any, name: str, batched: bool) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    want = "[K, 5, 2]" if batched else "[5, 2]"
    ok = arr.ndim == (3 if batched else 2) and arr.shape[-2:] == (5, 2)
    if not ok:
        raise ValueError(f"{name} must have shape {want}, got {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1) if batched else arr))
        where = f" (first at image {int(bad[0][0])})" if batched else ""
        raise ValueError(f"{name} contains NaN or infinite values{where}")
    return arr


def _as_sizes(value: Any, name: str, count: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (count, 2):
        raise ValueError(
            f"{name} must have shape [{count}, 2] (width, height), got {tuple(arr.shape)}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and positive (width, height)")
    return arr


def _as_size(width: Any, height: Any) -> tuple[float, float]:
    try:
        w, h = float(width), float(height)
    except (TypeError, ValueError):
        raise ValueError(f"width/height must be numbers, got {width!r}, {height!r}") from None
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"width/height must be finite and positive, got {width!r}, {height!r}")
    return w, h


def _as_shape(value: Any, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (5, 3) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a finite [5, 3] array, got shape {tuple(arr.shape)}")
    return arr


# --------------------------------------------------------------------------------------------
# rotations (vectorised)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# single-image estimators
# --------------------------------------------------------------------------------------------


def _pnp_camera(
    landmarks: np.ndarray, width: float, height: float, template: np.ndarray, flags: int
) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV PnP in our convention: head rotation R (cam = FLIP R p + t) and t."""
    k = camera_matrix(width, height)
    obj = np.ascontiguousarray(template, dtype=np.float64)
    img = np.ascontiguousarray(landmarks, dtype=np.float64).reshape(5, 1, 2)
    ok, rvec, tvec = cv2.solvePnP(obj, img, k, None, flags=flags)
    if not ok:
        raise RuntimeError("cv2.solvePnP failed")
    if flags != cv2.SOLVEPNP_EPNP:
        rvec, tvec = cv2.solvePnPRefineLM(obj, img, k, None, rvec, tvec)
    r_cv = cv2.Rodrigues(rvec)[0]
    return FLIP @ r_cv, tvec.ravel()


def legacy_epnp_pose(
    landmarks_2d: np.ndarray, width: float, height: float
) -> tuple[float, float, float]:
    """The original script's pose: EPnP on ``LEGACY_TEMPLATE_3D`` (in our convention).

    For comparison figures only: with five points EPnP is unstable, and the legacy template
    is far from real faces (nose 13 mm below the eyes instead of ~36 mm), so it is off by 10
    degrees or more.
    """
    lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=False)
    w, h = _as_size(width, height)
    rot, _ = _pnp_camera(lm, w, h, LEGACY_TEMPLATE_3D, cv2.SOLVEPNP_EPNP)
    return ypr_from_rotation(rot)


def _generic_rt(
    lm: np.ndarray, w: float, h: float, template: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Iterative PnP: SQPnP (global minimum of its object-space error), then LM on pixels."""
    try:
        rot, t = _pnp_camera(lm, w, h, template, cv2.SOLVEPNP_SQPNP)
    except (cv2.error, RuntimeError):
        t = np.zeros(3)
    if not (np.isfinite(t).all() and t[2] > 0):  # degenerate: EPnP start, then LM
        rot, t = _pnp_camera(lm, w, h, template, cv2.SOLVEPNP_EPNP)
        k = camera_matrix(w, h)
        obj = np.ascontiguousarray(template, dtype=np.float64)
        img = np.ascontiguousarray(lm, dtype=np.float64).reshape(5, 1, 2)
        rvec = cv2.Rodrigues(FLIP @ rot)[0]
        rvec, tvec = cv2.solvePnPRefineLM(obj, img, k, None, rvec, t.reshape(3, 1).copy())
        rot, t = FLIP @ cv2.Rodrigues(rvec)[0], tvec.ravel()
    return rot, t


def estimate_pose_generic(
    landmarks_2d: np.ndarray,
    width: float,
    height: float,
    template: np.ndarray | None = None,
    bias_deg: Sequence[float] | None = None,
) -> tuple[float, float, float]:
    """Single-image (yaw, pitch, roll) in degrees: iterative PnP with a mean face.

    ``template`` is the 3D mean face (default :data:`MEAN_FACE_3D`, whose frontal view is the
    ArcFace layout, which removes the legacy template's pitch bias); ``bias_deg`` is a
    correction added to the result (the dataset pass measures it on bundle-adjusted persons).
    Exact when the person's shape equals ``template`` and the landmarks are noise-free; otherwise
    off by what the person's geometry differs from the template (about 2 deg median).
    """
    lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=False)
    w, h = _as_size(width, height)
    tpl = MEAN_FACE_3D if template is None else _as_shape(template, "template")
    rot, _ = _generic_rt(lm, w, h, tpl)
    ypr = np.array(ypr_from_rotation(rot))
    if bias_deg is not None:
        ypr = ypr + np.asarray(bias_deg, dtype=np.float64).reshape(3)
    return float(ypr[0]), float(ypr[1]), float(ypr[2])


def estimate_poses_generic(
    landmarks_2d: np.ndarray,
    sizes: np.ndarray,
    template: np.ndarray | None = None,
    bias_deg: Sequence[float] | None = None,
) -> np.ndarray:
    """:func:`estimate_pose_generic` for a batch: [N,5,2], [N,2] -> [N,3] degrees."""
    lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=True)
    sz = _as_sizes(sizes, "sizes", lm.shape[0])
    tpl = MEAN_FACE_3D if template is None else _as_shape(template, "template")
    rot = (
        np.stack([_generic_rt(lm[i], sz[i, 0], sz[i, 1], tpl)[0] for i in range(lm.shape[0])])
        if lm.shape[0]
        else np.zeros((0, 3, 3))
    )
    ypr = _ypr_batch(rot)
    if bias_deg is not None:
        ypr = ypr + np.asarray(bias_deg, dtype=np.float64).reshape(1, 3)
    return ypr


# --------------------------------------------------------------------------------------------
# per-person bundle adjustment
# --------------------------------------------------------------------------------------------


@dataclass
class BundleConfig:
    """Noise model and priors of :func:`fit_person` (see the module docstring)."""

    sigma_px: float = 1.0  # landmark noise, pixels
    robust_scale: float = 3.0  # soft-L1 knee, in sigma_px units (detector outliers)
    # yaw, pitch, roll of the front (ID) photos around frontal
    sigma_front_deg: tuple[float, float, float] = (3.0, 3.0, 2.0)
    # shape priors, in mm for a 63 mm inter-ocular distance (scaled with the mean face's)
    sigma_shape_mm: float = 3.5  # each centred coordinate vs the mean face
    sigma_asym_mm: float = 2.0  # mirror symmetry (pair mid-points vs nose x, pair y/z differences)
    max_nfev: int = 60
    min_images: int = 4  # fewer: generic fallback


@dataclass
class PersonFit:
    """Result of :func:`fit_person` (K images)."""

    poses: np.ndarray  # [K,3] yaw, pitch, roll, degrees
    shape: np.ndarray  # [5,3] head frame (nose tip at the origin, mean-face scale)
    translations: np.ndarray  # [K,3] camera frame (cam = FLIP R p + t)
    rms_px: float  # RMS landmark reprojection error (all images, pixels)
    method: str  # "bundle" | "generic"
    converged: bool
    rms_px_per_image: np.ndarray = field(default_factory=lambda: np.zeros(0))
    nfev: int = 0
    front_ignored: int = 0  # front photos whose frontal prior was dropped (> 4 sigma off)


def _mm_scale(mean_shape: np.ndarray) -> float:
    """Size of the mean face relative to a 63 mm inter-ocular distance."""
    return float(np.linalg.norm(mean_shape[1] - mean_shape[0])) / 63.0


class _Bundle:
    """One person's bundle adjustment by variable projection.

    ``least_squares`` optimises only the 12 shape parameters (points 0, 1, 3, 4; the nose tip
    is the origin); for each trial shape the K poses (Rodrigues vector of the head rotation R,
    camera translation t) are solved to convergence by a robust Levenberg-Marquardt vectorised
    over all images (soft-L1 with Triggs' Hessian weights W), and the Jacobian is the
    Schur-reduced one ``J_s - J_p (J_p' W J_p)^-1 J_p' W J_s``.  Same minimum as the joint
    problem, but the linear algebra is 6x6 blocks plus a [10K, 12] matrix instead of a
    [10K, 6K+12] one.

    Residual order: K*10 landmark residuals (pixels / sigma_px), K*3 front-photo priors (zero
    rows for other images), 15 centred shape-vs-mean-face priors, 6 mirror-symmetry priors.
    """

    def __init__(self, lm, sizes, front_mask, mean_shape, cfg: BundleConfig, r0, t0):
        self.k = k = lm.shape[0]
        self.lm, self.cfg = lm, cfg
        self.f = sizes[:, 0][:, None]
        self.c = sizes[:, None, :] / 2.0
        self.front_w = front_mask.astype(np.float64)[:, None]  # [K,1]
        self.mean_c = mean_shape - mean_shape.mean(axis=0)
        mm = _mm_scale(mean_shape)
        self.sig_shape = np.full((5, 3), cfg.sigma_shape_mm * mm)
        self.sig_front = np.radians(np.array(cfg.sigma_front_deg))[[1, 0, 2]]  # rotvec ~ (-p, y, r)
        self.c2 = cfg.robust_scale**2
        self.n_data = 10 * k
        sel = np.zeros((5, 4))
        sel[list(_FREE_POINTS), range(4)] = 1.0
        centre = (np.eye(5) - 1.0 / 5.0) @ sel  # centred point p <- free point f
        js = np.einsum("pf,cd->pcfd", centre, np.eye(3)).reshape(15, 12)
        self.j_shape = js / self.sig_shape.reshape(15, 1)
        sym = np.zeros((6, 12))
        for row, (a, b) in enumerate(_PAIRS):
            fa, fb = _FREE_POINTS.index(a), _FREE_POINTS.index(b)
            sym[3 * row + 0, 3 * fa + 0] = sym[3 * row + 0, 3 * fb + 0] = 0.5  # mid-x vs nose x
            sym[3 * row + 1, 3 * fa + 1], sym[3 * row + 1, 3 * fb + 1] = 1.0, -1.0
            sym[3 * row + 2, 3 * fa + 2], sym[3 * row + 2, 3 * fb + 2] = 1.0, -1.0
        self.j_sym = sym / (cfg.sigma_asym_mm * mm)
        self.r, self.t = r0.copy(), t0.copy()
        self._key: bytes | None = None
        self.inner_iters = 0

    def set_knee(self, scale: float) -> None:
        """Soft-L1 knee in sigma_px units (the cached pose solution depends on it)."""
        self.c2 = float(scale) ** 2
        self._key = None

    @staticmethod
    def shape_from_x(x):
        s = np.zeros((5, 3))
        s[list(_FREE_POINTS)] = x.reshape(4, 3)
        return s

    @staticmethod
    def x_from_shape(s):
        s = s - s[NOSE]
        return s[list(_FREE_POINTS)].ravel().copy()

    # ---- per-image model -------------------------------------------------------------------
    def _model(self, s, r, t, with_shape_jac=False):
        """Residuals [K,13], pose Jacobian [K,13,6] (and shape Jacobian [K,10,12])."""
        k = self.k
        rot, jr = _rodrigues_with_jac(r)
        rs = s @ rot.transpose(0, 2, 1)  # [K,5,3] rotated points (head axes)
        flip = np.diag(FLIP)
        cam = rs * flip + t[:, None, :]
        inv_z = 1.0 / cam[..., 2]
        fz = self.f * inv_z / self.cfg.sigma_px  # [K,5]
        uv = (self.f * inv_z)[..., None] * cam[..., :2] + self.c
        e = np.empty((k, 13))
        e[:, :10] = ((uv - self.lm) / self.cfg.sigma_px).reshape(k, 10)
        e[:, 10:] = self.front_w * r / self.sig_front
        # d(u,v)/d cam = fz * [[1, 0, -x/z], [0, 1, -y/z]]
        duv = np.zeros((k, 5, 2, 3))
        duv[..., 0, 0] = fz
        duv[..., 1, 1] = fz
        duv[..., :, 2] = -fz[..., None] * cam[..., :2] * inv_z[..., None]
        # d cam / d r = FLIP (-R [s]_x J_r) = -FLIP [R s]_x (R J_r)
        d_rot = -(_skew(rs) @ (rot @ jr)[:, None]) * flip[:, None]  # [K,5,3,3]
        jp = np.zeros((k, 13, 6))
        jp[:, :10, :3] = (duv @ d_rot).reshape(k, 10, 3)
        jp[:, :10, 3:] = duv.reshape(k, 10, 3)
        jp[:, 10:, :3] = self.front_w[:, :, None] * np.diag(1.0 / self.sig_front)
        if not with_shape_jac:
            return e, jp, cam
        jpt = duv @ (rot * flip[None, :, None])[:, None]  # d cam / d s_p = FLIP R -> [K,5,2,3]
        js = np.zeros((k, 5, 2, 4, 3))
        for fi, p in enumerate(_FREE_POINTS):
            js[:, p, :, fi, :] = jpt[:, p]
        return e, jp, cam, js.reshape(k, 10, 12)

    def _rho(self, e):
        """Robust cost per image [K] and the weights of its gradient (rho') and of its
        Gauss-Newton Hessian (rho' + 2 rho'' z, Triggs' correction), both [K,13]; soft-L1 on
        the landmark residuals, plain squares on the priors."""
        t = 1.0 + e[:, :10] ** 2 / self.c2
        wg = np.ones_like(e)
        wh = np.ones_like(e)
        wg[:, :10] = t**-0.5
        wh[:, :10] = t**-1.5
        cost = 2.0 * self.c2 * np.sum(np.sqrt(t) - 1.0, axis=1) + np.sum(e[:, 10:] ** 2, axis=1)
        return cost, wg, wh

    def solve_poses(self, s, max_iter=40):
        """Robust LM for all K poses at a fixed shape (warm-started from the last solution)."""
        r, t = self.r.copy(), self.t.copy()
        e, jp, _ = self._model(s, r, t)
        cost, wg, wh = self._rho(e)
        lam = np.full(self.k, 1e-3)
        eye6 = np.eye(6)
        for _ in range(max_iter):
            jt = jp.transpose(0, 2, 1)
            h = (jt * wh[:, None, :]) @ jp
            g = jt @ (wg * e)[..., None]
            dh = np.diagonal(h, axis1=1, axis2=2)[:, :, None] * eye6
            step = -np.linalg.solve(h + lam[:, None, None] * (dh + 1e-9 * eye6), g)[..., 0]
            r_new, t_new = r + step[:, :3], t + step[:, 3:]
            e_new, jp_new, cam_new = self._model(s, r_new, t_new)
            cost_new, wg_new, wh_new = self._rho(e_new)
            ok = (cost_new <= cost) & np.all(cam_new[..., 2] > 0, axis=1)
            r[ok], t[ok] = r_new[ok], t_new[ok]
            e[ok], jp[ok], wg[ok], wh[ok] = e_new[ok], jp_new[ok], wg_new[ok], wh_new[ok]
            tiny = np.abs(cost - cost_new) <= 1e-12 * (1.0 + cost)
            cost[ok] = cost_new[ok]
            lam = np.where(ok, lam * 0.3, lam * 10.0).clip(1e-9, 1e9)
            self.inner_iters += 1
            rel = np.max(np.abs(step[:, :3]), axis=1) + np.max(
                np.abs(step[:, 3:]), axis=1
            ) / np.abs(t[:, 2])
            if np.all((rel < 1e-7) | tiny | (lam >= 1e9)):
                break
        self.r, self.t = r, t
        return r, t

    # ---- outer problem (shape) -------------------------------------------------------------
    def _evaluate(self, x):
        key = x.tobytes()
        if key == self._key:
            return self._cached
        s = self.shape_from_x(x)
        r, t = self.solve_poses(s)
        e, jp, _, js = self._model(s, r, t, with_shape_jac=True)
        self._key = key
        self._cached = (s, e, jp, js)
        return self._cached

    def residuals(self, x):
        s, e, _, _ = self._evaluate(x)
        sc = s - s.mean(axis=0)
        shape = ((sc - self.mean_c) / self.sig_shape).ravel()
        return np.concatenate([e[:, :10].ravel(), e[:, 10:].ravel(), shape, self.j_sym @ x])

    def jacobian(self, x):
        s, e, jp, js = self._evaluate(x)
        _, _, wh = self._rho(e)
        k = self.k
        jwt = (jp * wh[..., None]).transpose(0, 2, 1)
        h = jwt @ jp + 1e-12 * np.eye(6)
        js13 = np.zeros((k, 13, 12))
        js13[:, :10] = js
        red = js13 - jp @ np.linalg.solve(h, jwt @ js13)  # J_s - J_p H^-1 J_p' W'' J_s
        return np.concatenate(
            [
                red[:, :10].reshape(10 * k, 12),
                red[:, 10:].reshape(3 * k, 12),
                self.j_shape,
                self.j_sym,
            ]
        )

    def loss(self, z):
        """soft-L1 on the landmark residuals, plain squares on the priors (f_scale = 1)."""
        out = np.empty((3, z.size))
        out[0], out[1], out[2] = z, 1.0, 0.0
        nd, c2 = self.n_data, self.c2
        t = 1.0 + z[:nd] / c2
        out[0, :nd] = 2.0 * c2 * (np.sqrt(t) - 1.0)
        out[1, :nd] = t**-0.5
        out[2, :nd] = -0.5 * t**-1.5 / c2
        return out


def _solve(prob: _Bundle, x0: np.ndarray, cfg: BundleConfig, tol: float):
    return least_squares(
        prob.residuals,
        x0,
        jac=prob.jacobian,
        loss=prob.loss,
        method="trf",
        x_scale="jac",
        max_nfev=cfg.max_nfev,
        xtol=max(tol, 1e-8),
        ftol=tol,
        gtol=min(tol, 1e-8),
    )


def _generic_fit(lm, sizes, template, bias_deg=None) -> PersonFit:
    """Per-image generic estimates packaged as a PersonFit (method "generic")."""
    k = lm.shape[0]
    rots, ts = [], []
    for i in range(k):
        rot, t = _generic_rt(lm[i], sizes[i, 0], sizes[i, 1], template)
        rots.append(rot)
        ts.append(t)
    rot = np.stack(rots) if k else np.zeros((0, 3, 3))
    trans = np.stack(ts) if k else np.zeros((0, 3))
    poses = _ypr_batch(rot)
    if bias_deg is not None and k:
        poses = poses + np.asarray(bias_deg, dtype=np.float64).reshape(1, 3)
    err = (
        np.linalg.norm(_project_batch(template, rot, trans, sizes) - lm, axis=-1)
        if k
        else np.zeros((0, 5))
    )
    per_img = np.sqrt(np.mean(err**2, axis=1)) if k else np.zeros(0)
    rms = float(np.sqrt(np.mean(err**2))) if k else float("nan")
    return PersonFit(poses, template.copy(), trans, rms, "generic", True, per_img, 0)


def fit_person(
    landmarks_2d: np.ndarray,
    sizes: np.ndarray,
    front_mask: np.ndarray,
    *,
    mean_shape: np.ndarray | None = None,
    config: BundleConfig | None = None,
    init: PersonFit | None = None,
    min_images: int | None = None,
) -> PersonFit:
    """Bundle-adjust one person: 5-point shape [5,3] and the poses of all K images.

    ``landmarks_2d`` [K,5,2] pixels, ``sizes`` [K,2] (width, height), ``front_mask`` [K] bool
    (the ID photo(s)).  ``mean_shape`` is the prior/initial face (default
    :data:`MEAN_FACE_3D`); ``init`` an earlier fit to start from.  With fewer than
    ``min_images`` (default ``config.min_images``) images the generic estimate is returned
    (``method == "generic"``).  Poses are degrees in geometry.py's convention.

    Steps: generic PnP per image (mean face) as the start; when that start misfits by more than
    the soft-L1 knee, a first solve with a wide knee; the robust solve; then front photos more
    than 4 sigma off frontal lose their prior (``front_ignored``) and the fit is repeated.
    ``converged`` is False when the solver hit ``max_nfev``, or the result is not finite or
    puts a face behind the camera.
    """
    cfg = config or BundleConfig()
    lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=True)
    k = lm.shape[0]
    sz = _as_sizes(sizes, "sizes", k)
    fm = np.asarray(front_mask)
    if fm.shape != (k,):
        raise ValueError(f"front_mask must have shape [{k}], got {tuple(fm.shape)}")
    if fm.dtype != bool:
        if not np.all(np.isin(fm, (0, 1))):
            raise ValueError("front_mask must be boolean")
        fm = fm.astype(bool)
    mean = MEAN_FACE_3D if mean_shape is None else _as_shape(mean_shape, "mean_shape")
    mean = mean - mean[NOSE]
    need = cfg.min_images if min_images is None else int(min_images)
    if k < max(need, 2):
        return _generic_fit(lm, sz, mean)

    if init is not None and init.method == "bundle" and init.poses.shape == (k, 3):
        r0 = _rotvec_from_matrix(_rot_from_ypr_batch(init.poses))
        t0, s0 = np.asarray(init.translations, float), np.asarray(init.shape, float)
    else:
        g = _generic_fit(lm, sz, mean)
        r0 = _rotvec_from_matrix(_rot_from_ypr_batch(g.poses))
        t0, s0 = g.translations, mean
    front_ignored = 0
    if fm.sum() > max(2, k // 2):  # mostly "front": not ID photos, so no frontal prior at all
        front_ignored, fm = int(fm.sum()), np.zeros(k, dtype=bool)
    prob = _Bundle(lm, sz, fm, mean, cfg, r0, t0)
    x0 = prob.x_from_shape(s0)
    nfev = 0
    # Graduated robustness: when the start misfits badly (a person unlike the mean face), the
    # soft-L1 knee would flatten every residual and stall the shape; fit with a wide knee first.
    e0, _, _ = prob._model(s0, prob.r, prob.t)
    rms0 = float(np.sqrt(np.mean(e0[:, :10] ** 2)))
    if rms0 > cfg.robust_scale:
        prob.set_knee(3.0 * rms0)
        res = _solve(prob, x0, cfg, tol=1e-6)
        x0, nfev = res.x, res.nfev
        prob.set_knee(cfg.robust_scale)
    res = _solve(prob, x0, cfg, tol=1e-9)
    nfev += res.nfev
    # A "front" photo far from frontal (> 4 sigma: mislabelled, or not an ID photo) would drag
    # the whole person's gauge: drop its prior and refit.
    for _ in range(3):
        ypr = _ypr_batch(_rodrigues_with_jac(prob.r)[0])
        far = (prob.front_w[:, 0] > 0) & np.any(
            np.abs(ypr) > 4.0 * np.asarray(cfg.sigma_front_deg), axis=1
        )
        if not far.any():
            break
        front_ignored += int(far.sum())
        prob.front_w[far] = 0.0
        prob._key = None
        res = _solve(prob, res.x, cfg, tol=1e-9)
        nfev += res.nfev
    s = prob.shape_from_x(res.x)
    r, t = prob.solve_poses(s)
    rot, _ = _rodrigues_with_jac(r)
    err = np.linalg.norm(_project_batch(s, rot, t, sz) - lm, axis=-1)
    ok = bool(res.status > 0 and np.all(np.isfinite(res.x)) and np.all(t[:, 2] > 0))
    return PersonFit(
        poses=_ypr_batch(rot),
        shape=s,
        translations=t,
        rms_px=float(np.sqrt(np.mean(err**2))),
        method="bundle",
        converged=ok,
        rms_px_per_image=np.sqrt(np.mean(err**2, axis=1)),
        nfev=int(nfev),
        front_ignored=front_ignored,
    )


# --------------------------------------------------------------------------------------------
# whole dataset
# --------------------------------------------------------------------------------------------


def _shape_in_front_frame(fit: PersonFit, front_mask: np.ndarray) -> np.ndarray:
    """The fitted shape rotated into the frame in which the person's front photo is frontal."""
    s = fit.shape
    idx = np.flatnonzero(front_mask)
    if idx.size:
        # average front rotation (projected back onto SO(3)); usually one photo
        m = _rot_from_ypr_batch(fit.poses[idx]).sum(axis=0)
        u, _, vt = np.linalg.svd(m)
        rf = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
        s = s @ rf.T
    return s


def mean_face_from_fits(
    shapes: Sequence[np.ndarray], scale_like: np.ndarray = MEAN_FACE_3D
) -> np.ndarray:
    """Mean face of several fitted shapes: centred, scaled to ``scale_like``'s size, averaged
    (coordinate-wise median, robust to a few bad fits), mirror-symmetrised, nose tip moved to
    the origin."""
    ref = scale_like - scale_like.mean(axis=0)
    ref_size = np.sqrt(np.sum(ref**2))
    acc = []
    for s in shapes:
        c = s - s.mean(axis=0)
        acc.append(c * (ref_size / np.sqrt(np.sum(c**2))))
    m = np.median(acc, axis=0)
    mirrored = m[[1, 0, 2, 4, 3]] * np.array([-1.0, 1.0, 1.0])
    m = 0.5 * (m + mirrored)
    m[NOSE, 0] = 0.0
    return m - m[NOSE]


@dataclass
class PoseReport:
    """What :func:`estimate_dataset_poses` did."""

    n_images: int = 0
    n_persons: int = 0
    n_bundle_persons: int = 0
    n_generic_persons: int = 0
    generic_persons: list[str] = field(default_factory=list)
    generic_reasons: dict[str, str] = field(default_factory=dict)
    n_not_converged: int = 0
    n_front_photos_ignored: int = 0  # "front" photos > 4 sigma off frontal (prior dropped)
    not_converged_persons: list[str] = field(default_factory=list)
    median_rms_px: float = float("nan")  # over bundle-adjusted persons
    p90_rms_px: float = float("nan")
    min_images: int = 4
    mean_face_refined: bool = False
    mean_face_persons: int = 0  # persons whose shapes made the dataset mean face
    mean_face: list[list[float]] = field(default_factory=list)  # [5,3] used for pass 2 / fallback
    generic_bias_deg: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    seconds: float = 0.0
    ms_per_person: float = 0.0
    num_workers: int = 1  # processes that fitted persons (1: in-process)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("median_rms_px", "p90_rms_px"):
            if not math.isfinite(d[key]):
                d[key] = None
        return d


def _fit_chunk(args) -> list[PersonFit]:
    items, mean, cfg = args
    out = []
    for lm, sz, fm, init in items:
        out.append(fit_person(lm, sz, fm, mean_shape=mean, config=cfg, init=init, min_images=2))
    return out


def _run_fits(items, mean, cfg, pool: ProcessPoolExecutor | None, workers: int):
    if pool is None:
        return _fit_chunk((items, mean, cfg))
    n_chunks = min(len(items), workers * 4)
    bounds = np.linspace(0, len(items), n_chunks + 1).astype(int)
    chunks = [
        (items[a:b], mean, cfg) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a
    ]
    return [fit for chunk in pool.map(_fit_chunk, chunks) for fit in chunk]


def estimate_dataset_poses(
    person_names: Sequence[str],
    roles: Sequence[str],
    landmarks_2d: np.ndarray,
    sizes: np.ndarray,
    min_images: int = 4,
    *,
    num_workers: int | None = 1,
    config: BundleConfig | None = None,
    refine_mean: bool = True,
    min_persons_for_mean: int = 5,
    mean_face_max_persons: int = 150,
    mean_shape: np.ndarray | None = None,
) -> tuple[np.ndarray, PoseReport]:
    """(yaw, pitch, roll) for every image of a legacy dataset -> (poses [N,3] float32, report).

    Images are grouped by ``person_names``; ``roles[i] == "front"`` (any case) marks ID photos.
    Persons with at least ``min_images`` images are bundle-adjusted.  With ``refine_mean`` and
    at least ``min_persons_for_mean`` such persons, a first pass over at most
    ``mean_face_max_persons`` of them (evenly spread, those with a front photo) around
    ``mean_shape`` (default :data:`MEAN_FACE_3D`) gives the dataset's mean face -- each shape
    rotated into its front photo's frame, so the population's pitch zero is "ID photos are
    frontal on average" -- and every person is then fitted around that mean.  The other
    persons (too few images, or a fit that did not converge) get the generic estimate with the
    dataset mean face plus the median (bundle - generic) offset measured on the
    bundle-adjusted persons (applied only with at least ``min_persons_for_mean`` of them); the
    report names them.  ``num_workers`` > 1 fits persons in a spawned process pool (None: all
    cores; used when there are at least two persons per worker).
    """
    t_start = time.perf_counter()
    cfg = config or BundleConfig()
    lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=True)
    n = lm.shape[0]
    sz = _as_sizes(sizes, "sizes", n)
    names = list(person_names)
    role_list = list(roles)
    if len(names) != n:
        raise ValueError(f"person_names has {len(names)} entries, landmarks_2d has {n} images")
    if len(role_list) != n:
        raise ValueError(f"roles has {len(role_list)} entries, landmarks_2d has {n} images")
    if min_images < 2:
        raise ValueError(f"min_images must be >= 2, got {min_images}")
    front = np.array([str(r).lower() == "front" for r in role_list], dtype=bool)
    workers = (os.cpu_count() or 1) if num_workers is None else max(1, int(num_workers))
    mean0 = MEAN_FACE_3D if mean_shape is None else _as_shape(mean_shape, "mean_shape")
    mean0 = mean0 - mean0[NOSE]

    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(str(name), []).append(i)
    bundle_names = [p for p, idx in groups.items() if len(idx) >= min_images]
    generic_names = [p for p, idx in groups.items() if len(idx) < min_images]
    reasons = {p: f"{len(groups[p])} image(s) < min_images={min_images}" for p in generic_names}

    poses = np.zeros((n, 3))
    items = [(lm[groups[p]], sz[groups[p]], front[groups[p]], None) for p in bundle_names]
    pool = None
    used_workers = 1
    if workers > 1 and len(items) >= 2 * workers:
        used_workers = workers
        # spawn, not fork: the caller may hold threads (torch, Ray); one pool for both passes
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        mean, refined, mean_persons = mean0, False, 0
        if refine_mean and len(bundle_names) >= min_persons_for_mean:
            # pass 1 on (at most mean_face_max_persons, evenly spread) persons with a front photo
            cand = [i for i, it in enumerate(items) if it[2].any()]
            if len(cand) < min_persons_for_mean:
                cand = list(range(len(items)))
            if len(cand) > mean_face_max_persons:
                pick = np.linspace(0, len(cand) - 1, mean_face_max_persons).round().astype(int)
                cand = [cand[j] for j in pick]
            fits1 = _run_fits([items[i] for i in cand], mean0, cfg, pool, workers)
            good = [j for j, f in enumerate(fits1) if f.converged and not f.front_ignored]
            if len(good) >= min_persons_for_mean:
                # each shape in its front photo's frame: the population's pitch zero is
                # "ID photos are frontal on average", whatever mean0 says
                shapes = [_shape_in_front_frame(fits1[j], items[cand[j]][2]) for j in good]
                mean = mean_face_from_fits(shapes, mean0)
                mean_persons, refined = len(good), True
                for j in good:  # warm start for pass 2
                    a, b, c, _ = items[cand[j]]
                    items[cand[j]] = (a, b, c, fits1[j])
        fits = _run_fits(items, mean, cfg, pool, workers)
    finally:
        if pool is not None:
            pool.shutdown()

    not_conv = []
    for p, fit in zip(bundle_names, fits, strict=True):
        if fit.converged:
            poses[groups[p]] = fit.poses
        else:  # keep it in the generic group, with the reason
            not_conv.append(p)
            generic_names.append(p)
            reasons[p] = "bundle adjustment did not converge"

    bias = np.zeros(3)
    if sum(f.converged for f in fits) >= min_persons_for_mean:
        # calibrate the generic estimator against the bundle-adjusted persons (always, so the
        # report shows it; cheap: at most 4000 single-image PnPs); too few persons: no bias
        idx = np.concatenate(
            [groups[p] for p, f in zip(bundle_names, fits, strict=True) if f.converged]
        )
        if idx.size > 4000:
            idx = np.random.default_rng(0).choice(idx, 4000, replace=False)
        gen = estimate_poses_generic(lm[idx], sz[idx], template=mean)
        diff = poses[idx] - gen
        diff[:, 0] = (diff[:, 0] + 180.0) % 360.0 - 180.0
        diff[:, 2] = (diff[:, 2] + 180.0) % 360.0 - 180.0
        bias = np.median(diff, axis=0)
    for p in generic_names:
        idx = groups[p]
        poses[idx] = estimate_poses_generic(lm[idx], sz[idx], template=mean, bias_deg=bias)

    rms = np.array([f.rms_px for f in fits if f.converged])
    elapsed = time.perf_counter() - t_start
    report = PoseReport(
        n_images=n,
        n_persons=len(groups),
        n_bundle_persons=len(bundle_names) - len(not_conv),
        n_generic_persons=len(generic_names),
        generic_persons=sorted(generic_names),
        generic_reasons=reasons,
        n_not_converged=len(not_conv),
        n_front_photos_ignored=int(sum(f.front_ignored for f in fits)),
        not_converged_persons=not_conv,
        median_rms_px=float(np.median(rms)) if rms.size else float("nan"),
        p90_rms_px=float(np.percentile(rms, 90)) if rms.size else float("nan"),
        min_images=int(min_images),
        mean_face_refined=refined,
        mean_face_persons=mean_persons,
        mean_face=mean.round(3).tolist(),
        generic_bias_deg=[float(b) for b in bias],
        seconds=elapsed,
        ms_per_person=1000.0 * elapsed / max(1, len(groups)),
        num_workers=used_workers,
    )
    return poses.astype(np.float32), report


# --------------------------------------------------------------------------------------------
# synthetic 5-point test set (tests and benchmarks/pose_accuracy.py)
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticLandmarkSet:
    """Output of :func:`synthesize_landmark_set`; per-image arrays are aligned ([N, ...])."""

    person_names: list[str]
    roles: list[str]  # "front" (one per person, first) or "video"
    landmarks_2d: np.ndarray  # [N,5,2] noisy pixels
    sizes: np.ndarray  # [N,2] width, height
    poses: np.ndarray  # [N,3] true yaw, pitch, roll (degrees)
    translations: np.ndarray  # [N,3]
    person_index: np.ndarray  # [N] int
    shapes: np.ndarray  # [P,5,3] true head-frame shapes
    population_mean: np.ndarray  # [5,3]


def pose_errors(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Absolute angle errors [N,3] in degrees (wrapped to [0, 180])."""
    d = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
    return np.abs((d + 180.0) % 360.0 - 180.0)


def synthesize_landmark_set(
    n_persons: int,
    frames: int,
    seed: int = 0,
    *,
    population_mean: np.ndarray | None = None,
    shape_rel_sigma: float = 0.07,
    shape_rel_max: float = 0.15,
    scale_sigma: float = 0.06,
    asym_mm: float = 1.0,
    front_max_deg: tuple[float, float, float] = (5.0, 5.0, 3.0),
    video_max_deg: tuple[float, float, float] = (70.0, 30.0, 20.0),
    noise_px: tuple[float, float] = (0.5, 1.0),
    width_range: tuple[int, int] = (112, 640),
    iod_fraction: tuple[float, float] = (0.25, 0.35),
) -> SyntheticLandmarkSet:
    """A synthetic 5-point dataset: ``n_persons`` persons, each with one front photo and
    ``frames`` video frames, with true poses.

    Identity geometry: the population mean face (default :data:`MEAN_FACE_3D`) with each
    mirror-symmetric coordinate (half-widths, heights, depths of the eye and mouth pairs) scaled
    by ``1 + u``, ``u ~ N(0, shape_rel_sigma)`` clipped to ``+-shape_rel_max``, an overall size
    factor, and an asymmetric ``N(0, asym_mm)`` jitter on all 15 coordinates.  Front photos are
    uniformly up to ``front_max_deg`` off frontal; video frames follow a smooth random
    trajectory (two sinusoids per axis) reaching up to ``video_max_deg``.  Image widths are
    log-uniform in ``width_range`` (square images, or 4:3 portrait for a quarter of the
    persons); the inter-ocular distance is ``iod_fraction`` of the width, as in aligned crops
    (f = width); Gaussian landmark noise with a per-image sigma uniform in ``noise_px``.
    """
    if n_persons < 1 or frames < 0:
        raise ValueError("n_persons must be >= 1 and frames >= 0")
    rng = np.random.default_rng(seed)
    mean = (
        MEAN_FACE_3D if population_mean is None else _as_shape(population_mean, "population_mean")
    )
    mean = mean - mean[NOSE]
    names, roles, lms, sizes, poses, trans, pidx, shapes = [], [], [], [], [], [], [], []
    for p in range(n_persons):
        s = mean.copy()
        for a, b in _PAIRS:
            u = np.clip(rng.normal(0.0, shape_rel_sigma, 3), -shape_rel_max, shape_rel_max)
            half = 0.5 * (s[b] + s[a] * np.array([-1.0, 1.0, 1.0]))  # (|x|, y, z) of the pair
            half = half * (1.0 + u)
            s[a] = half * np.array([-1.0, 1.0, 1.0])
            s[b] = half
        s *= 1.0 + np.clip(rng.normal(0.0, scale_sigma), -0.15, 0.15)
        s += rng.normal(0.0, asym_mm, (5, 3))
        shapes.append(s)
        iod = np.linalg.norm(s[1] - s[0])

        n_img = frames + 1
        ypr = np.zeros((n_img, 3))
        ypr[0] = rng.uniform(-1.0, 1.0, 3) * np.array(front_max_deg)
        tt = np.linspace(0.0, 1.0, frames)
        for ax in range(3):
            amp = video_max_deg[ax] * rng.uniform(0.6, 1.0)
            w1, w2 = rng.uniform(0.5, 1.5), rng.uniform(1.5, 3.0)
            ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
            traj = 0.8 * np.sin(2 * np.pi * w1 * tt + ph1) + 0.2 * np.sin(2 * np.pi * w2 * tt + ph2)
            ypr[1:, ax] = amp * traj
        w_front = float(np.exp(rng.uniform(*np.log(width_range))))
        w_video = float(np.exp(rng.uniform(*np.log(width_range))))
        portrait = rng.random() < 0.25
        for i in range(n_img):
            w = round(w_front if i == 0 else w_video)
            h = round(w * 4 / 3) if portrait else w
            frac = rng.uniform(*iod_fraction)
            zdist = iod / frac  # f = w: iod_px = w * iod / z
            t = np.array(
                [rng.uniform(-0.05, 0.05) * zdist, rng.uniform(-0.05, 0.05) * zdist, zdist]
            )
            rot = rotation_from_ypr(*ypr[i])
            uv = project(head_to_camera(s, rot, t), w, h)
            uv = uv + rng.normal(0.0, rng.uniform(*noise_px), uv.shape)
            names.append(f"person_{p:05d}")
            roles.append("front" if i == 0 else "video")
            lms.append(uv)
            sizes.append((w, h))
            poses.append(ypr[i])
            trans.append(t)
            pidx.append(p)
    return SyntheticLandmarkSet(
        person_names=names,
        roles=roles,
        landmarks_2d=np.array(lms),
        sizes=np.array(sizes, dtype=np.float64),
        poses=np.array(poses),
        translations=np.array(trans),
        person_index=np.array(pidx),
        shapes=np.array(shapes),
        population_mean=mean,
    )
