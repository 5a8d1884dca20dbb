"""A synthetic 5-point landmark set with true poses, for the pose tests and
``benchmarks/pose_accuracy.py`` (test data, not production code: it lived in data/pose.py).

Identity-dependent geometry, off-frontal front photos, smooth video trajectories, pixel noise;
the camera and angles follow :mod:`controlnet_ray.data.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlnet_ray.data.geometry import head_to_camera, project, rotation_from_ypr
from controlnet_ray.data.pose.mean_face import _PAIRS, MEAN_FACE_3D, NOSE
from controlnet_ray.data.pose.validation import _as_shape


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
