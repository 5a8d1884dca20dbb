"""Single-image estimators: the original's EPnP on the legacy template (comparison only) and
iterative PnP with a mean face (the generic estimate)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy.optimize import least_squares

from controlnet_ray.data.geometry import (
    FLIP,
    LEGACY_TEMPLATE_3D,
    camera_matrix,
    head_to_camera,
    project,
    rotation_from_ypr,
    ypr_from_rotation,
)
from controlnet_ray.data.pose.mean_face import MEAN_FACE_3D
from controlnet_ray.data.pose.rotations import _ypr_batch
from controlnet_ray.data.pose.validation import _as_landmarks, _as_shape, _as_size, _as_sizes

#: A single-image fit whose landmark RMS exceeds this (inter-ocular distances: twice the 4 %
#: noise of real detectors) is not explained by the mean face -- an expression (a smile lifts the
#: mouth corners, which reads as foreshortening, i.e. pitch) or a misplaced point.
MISFIT_IOD = 0.08
#: Such a fit's pitch-0 alternative "fits about equally" when its squared error is at most this
#: many times the best one's (the best fit's own misfit sets the noise: 4 residual degrees of
#: freedom, so a ratio of 2 is a chi-square difference of 4).  On the synthetic 5-point set it
#: changes 1 % of the images and their pitch p90 by 0.04 deg; on dlib's 68 points of a smiling
#: face it turns a -51 deg pitch into a frontal one.
EQUAL_FIT_RATIO = 2.0


class PoseFitError(ValueError):
    """A pose fit failed numerically on one image; ``index`` is its position in the batch."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index, self.reason = index, reason


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


def fit_template(
    landmarks_2d: np.ndarray,
    width: float,
    height: float,
    template: np.ndarray,
    start_ypr: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rigid pose of a 3D ``template`` [5,3] seen as ``landmarks_2d`` [5,2]: rotation R and
    translation t (``cam = FLIP R p + t``), for point sets other than InsightFace's five.

    Without ``start_ypr``: :func:`estimate_pose_generic`'s PnP (its global minimum).  With it:
    Levenberg-Marquardt from that pose, i.e. the local minimum nearest to it -- for templates
    whose points leave the pose two-valued (four near-collinear eye corners and one nose
    point: two pitches fit equally well), where the nearest to a prior guess is wanted.
    """
    lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=False)
    w, h = _as_size(width, height)
    tpl = _as_shape(template, "template")
    if start_ypr is None:
        return _generic_rt(lm, w, h, tpl)
    k = camera_matrix(w, h)
    rot0 = rotation_from_ypr(*(float(v) for v in start_ypr))
    spread_3d = np.linalg.norm(tpl - tpl.mean(axis=0), axis=1).mean()
    spread_2d = np.linalg.norm(lm - lm.mean(axis=0), axis=1).mean()
    depth = w * spread_3d / max(spread_2d, 1e-9)
    centre = lm.mean(axis=0) - np.array([w / 2.0, h / 2.0])
    t0 = np.array([centre[0] * depth / w, centre[1] * depth / w, depth]) - FLIP @ rot0 @ tpl.mean(
        axis=0
    )
    obj = np.ascontiguousarray(tpl)
    img = np.ascontiguousarray(lm).reshape(5, 1, 2)
    rvec, tvec = cv2.solvePnPRefineLM(
        obj, img, k, None, cv2.Rodrigues(FLIP @ rot0)[0], t0.reshape(3, 1).copy()
    )
    return FLIP @ cv2.Rodrigues(rvec)[0], tvec.ravel()


def estimate_pose_generic(
    landmarks_2d: np.ndarray,
    width: float,
    height: float,
    template: np.ndarray | None = None,
    bias_deg: Sequence[float] | None = None,
) -> tuple[float, float, float]:
    """Single-image (yaw, pitch, roll) in degrees: :func:`estimate_poses_generic` of one image
    (the one code path of every single-image estimate: dataset fallback, calibration, photos).

    ``template`` is the 3D mean face (default :data:`MEAN_FACE_3D`, whose frontal view is the
    ArcFace layout, which removes the legacy template's pitch bias); ``bias_deg`` is a
    correction added to the result (the dataset pass measures it on bundle-adjusted persons).
    Exact when the person's shape equals ``template`` and the landmarks are noise-free; otherwise
    off by what the person's geometry differs from the template (about 2 deg median).
    """
    lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=False)
    w, h = _as_size(width, height)
    ypr = estimate_poses_generic(lm[None], np.array([[w, h]]), template, bias_deg)[0]
    return float(ypr[0]), float(ypr[1]), float(ypr[2])


def estimate_poses_generic(
    landmarks_2d: np.ndarray,
    sizes: np.ndarray,
    template: np.ndarray | None = None,
    bias_deg: Sequence[float] | None = None,
) -> np.ndarray:
    """Single-image estimates of a batch: [N,5,2], [N,2] -> [N,3] degrees.

    Each image: the global PnP minimum; when the mean face misfits it (:data:`MISFIT_IOD`) and
    the best fit at pitch 0 fits about equally (:data:`EQUAL_FIT_RATIO`), that one -- the
    solution closer to frontal.  ``bias_deg`` is added (see :func:`estimate_pose_generic`).
    """
    lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=True)
    sz = _as_sizes(sizes, "sizes", lm.shape[0])
    tpl = MEAN_FACE_3D if template is None else _as_shape(template, "template")
    rot = np.zeros((lm.shape[0], 3, 3))
    for i in range(lm.shape[0]):
        try:
            rot[i] = _frontal_if_equal(lm[i], sz[i, 0], sz[i, 1], tpl)
        except (cv2.error, np.linalg.LinAlgError, RuntimeError) as exc:
            raise PoseFitError(i, f"no head pose fits these landmarks ({exc})") from exc
    ypr = _ypr_batch(rot)
    if bias_deg is not None:
        ypr = ypr + np.asarray(bias_deg, dtype=np.float64).reshape(1, 3)
    return ypr


def _frontal_if_equal(lm: np.ndarray, w: float, h: float, tpl: np.ndarray) -> np.ndarray:
    """Rotation of one image's single-image fit (see :func:`estimate_poses_generic`)."""
    rot, t = _generic_rt(lm, w, h, tpl)
    iod = max(float(np.linalg.norm(lm[1] - lm[0])), 1e-9)
    best = float(np.sum((project(head_to_camera(tpl, rot, t), w, h) - lm) ** 2))
    if best <= 5 * (MISFIT_IOD * iod) ** 2:
        return rot
    yaw, _, roll = ypr_from_rotation(rot)

    def residuals(x: np.ndarray) -> np.ndarray:
        frontal = rotation_from_ypr(x[0], 0.0, x[1])
        return (project(head_to_camera(tpl, frontal, x[2:]), w, h) - lm).ravel()

    fit = least_squares(residuals, np.array([yaw, roll, *t]), method="lm")
    if fit.success and fit.x[4] > 0 and 2.0 * fit.cost <= EQUAL_FIT_RATIO * best:
        return rotation_from_ypr(fit.x[0], 0.0, fit.x[1])
    return rot
