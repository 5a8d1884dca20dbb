"""Per-person bundle adjustment: one person's 5-point shape jointly with the poses of all
their images, by variable projection (see the package docstring for the priors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from controlnet_ray.data.geometry import FLIP
from controlnet_ray.data.pose.mean_face import _FREE_POINTS, _PAIRS, MEAN_FACE_3D, NOSE
from controlnet_ray.data.pose.rotations import (
    _project_batch,
    _rodrigues_with_jac,
    _rot_from_ypr_batch,
    _rotvec_from_matrix,
    _skew,
    _ypr_batch,
)
from controlnet_ray.data.pose.single_image import _generic_rt
from controlnet_ray.data.pose.validation import _as_landmarks, _as_shape, _as_sizes


@dataclass
class BundleConfig:
    """Noise model and priors of :func:`fit_person` (see the package docstring)."""

    sigma_px: float = 1.0  # landmark noise floor, pixels
    # landmark noise as a fraction of the image's inter-ocular distance (real detectors: 2-5 %);
    # with 1 px on a real face the data outweigh the shape priors and the depth collapses
    sigma_iod: float = 0.04
    # each point's depth behind the nose tip, as multiples of the mean face's: no flattened or
    # depth-inverted face (which mirrors yaw when the images barely turn)
    depth_range: tuple[float, float] = (0.6, 1.6)
    robust_scale: float = 3.0  # soft-L1 knee, in noise units (detector outliers)
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
    error: str = ""  # why the fit failed numerically (then converged is False)


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

    Residual order: K*10 landmark residuals (pixels / per-image noise), K*3 front-photo priors (zero
    rows for other images), 15 centred shape-vs-mean-face priors, 6 mirror-symmetry priors.
    """

    def __init__(self, lm, sizes, front_mask, mean_shape, cfg: BundleConfig, r0, t0):
        self.k = k = lm.shape[0]
        self.lm, self.cfg = lm, cfg
        self.f = sizes[:, 0][:, None]
        iod = np.linalg.norm(lm[:, 1] - lm[:, 0], axis=1)
        self.sig_px = np.maximum(cfg.sigma_px, cfg.sigma_iod * iod)[:, None]  # [K,1]
        depth = (mean_shape - mean_shape[NOSE])[list(_FREE_POINTS), 2]  # negative: behind
        self.lower, self.upper = np.full(12, -np.inf), np.full(12, np.inf)
        self.lower[2::3], self.upper[2::3] = depth * cfg.depth_range[1], depth * cfg.depth_range[0]
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
        """Soft-L1 knee in noise units (the cached pose solution depends on it)."""
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
        fz = self.f * inv_z / self.sig_px  # [K,5]
        uv = (self.f * inv_z)[..., None] * cam[..., :2] + self.c
        e = np.empty((k, 13))
        e[:, :10] = ((uv - self.lm) / self.sig_px[:, :, None]).reshape(k, 10)
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
    z = slice(2, None, 3)  # the bounded coordinates (depths); least_squares needs x0 inside
    x0 = x0.copy()
    margin = 1e-6 * (prob.upper[z] - prob.lower[z])
    x0[z] = np.clip(x0[z], prob.lower[z] + margin, prob.upper[z] - margin)
    return least_squares(
        prob.residuals,
        x0,
        bounds=(prob.lower, prob.upper),
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

    g = _generic_fit(lm, sz, mean)
    if init is not None and init.method == "bundle" and init.poses.shape == (k, 3):
        r0 = _rotvec_from_matrix(_rot_from_ypr_batch(init.poses))
        t0, s0 = np.asarray(init.translations, float), np.asarray(init.shape, float)
    else:
        r0 = _rotvec_from_matrix(_rot_from_ypr_batch(g.poses))
        t0, s0 = g.translations, mean
    # a "front" photo whose own (prior-free) yaw is > 4 sigma off frontal loses its prior
    # before the fit, where the prior would pull it towards frontal (pitch: checked after the
    # fit, as the single-image pitch carries the mean face's bias)
    far = fm & (np.abs(g.poses[:, 0]) > 4.0 * cfg.sigma_front_deg[0])
    if fm.sum() > max(2, k // 2):  # mostly "front": not ID photos, so no frontal prior at all
        far = fm
    front_ignored, fm = int(far.sum()), fm & ~far
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
