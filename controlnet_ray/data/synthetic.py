"""Embedded synthetic multi-view face dataset, rendered on first use.

Why: the service must train and demo without any real data, and the model must learn to use
the *source* image (identity) and not only the target pose. So every identity is a procedurally
built 3D head (union of ellipsoids: skull, jaw, nose, lips, ears, hair shell; neck and shoulders
in an unrotated body frame) with its own shape, colours, hairline and one or two distinctive
surface marks (mole, freckles, scar, birthmark, glasses), rendered at *known* yaw/pitch/roll.

Rendering is per-pixel analytic ray casting in numpy (rays are taken into the head frame, where
every ellipsoid intersection is a closed-form quadratic), z-buffered across primitives so large
yaw self-occludes naturally, shaded with wrapped Lambert + ambient, 2x supersampled. Poses,
camera and landmarks follow :mod:`controlnet_ray.data.geometry` exactly (focal = image width).

Per identity the dataset has one near-frontal "ID photo" (plain light background, even frontal
light) and a "phone video": a smooth pose trajectory with cluttered drifting background, moving
coloured light and a little sensor noise. Files are written in the original on-disk layout via
:func:`controlnet_ray.data.layout.write_legacy_dataset`, plus ``ROOT/ground_truth.json`` with the
true poses and per-person 3D 5-point geometry for evaluating the pose estimator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from controlnet_ray.data.geometry import FLIP, head_to_camera, project, rotation_from_ypr

# Bump when the rendered output changes, so cached datasets are regenerated.
RENDER_VERSION = 1
SUPERSAMPLE = 2
JPEG_QUALITY = 92
LANDMARK_NOISE_PX = 0.5
FACE_DIR = "train/datas/face"
VIDEO_DIR = "train/datas/video"
DATA_DIR = "train/datas/file"

# Materials of the primitives (index into the albedo logic of _albedo).
SKIN, HAIR, LIPS, EAR, NECK, CLOTH, NOSE = range(7)

CREASE_MM = 6.0  # how far from a crease the skin normals are blended


# --------------------------------------------------------------------------------------------
# Public specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSpec:
    """What to render; its hash names the cache folder, so every field must change the output."""

    num_identities: int = 24
    frames_per_identity: int = 24
    seed: int = 0
    image_px: int = 160

    def __post_init__(self) -> None:
        if self.num_identities < 1 or self.frames_per_identity < 1:
            raise ValueError(f"need >= 1 identity and >= 1 frame per identity, got {self}")
        if self.image_px < 16:
            raise ValueError(f"image_px must be >= 16, got {self.image_px}")

    def digest(self) -> str:
        """Stable short hash of the spec and the renderer version (the cache key)."""
        payload = json.dumps({**dataclasses.asdict(self), "v": RENDER_VERSION}, sort_keys=True)
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Lighting:
    """One directional light plus ambient; direction is in the camera frame, towards the light."""

    direction: tuple[float, float, float] = (0.0, -0.35, -1.0)
    color: tuple[float, float, float] = (1.0, 1.0, 0.98)
    ambient: float = 0.5
    diffuse: float = 0.6


@dataclass(frozen=True)
class Background:
    """Plain gradient (ID photo) or cluttered, seeded, drifting scene (phone video)."""

    kind: Literal["plain", "cluttered"] = "plain"
    top: tuple[float, float, float] = (0.90, 0.91, 0.93)
    bottom: tuple[float, float, float] = (0.82, 0.84, 0.87)
    seed: int = 0
    drift: tuple[float, float] = (0.0, 0.0)  # shift of the clutter, in image widths
    blur: float = 1.0  # Gaussian sigma in pixels (out-of-focus background)


@dataclass(frozen=True)
class Placement:
    """Where the head sits in the camera frame: translation in millimetres (OpenCV axes)."""

    tx: float = 0.0
    ty: float = -15.0
    tz: float = 350.0

    def translation(self) -> np.ndarray:
        return np.array([self.tx, self.ty, self.tz], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Ellipsoid:
    """``|A (p - center)| = 1`` with ``A = diag(1/radii) @ axes.T``; axes are column vectors."""

    center: np.ndarray
    radii: np.ndarray
    material: int
    axes: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    a: np.ndarray = dataclasses.field(init=False, repr=False)
    quad: np.ndarray = dataclasses.field(init=False, repr=False)  # A^T A (gradient matrix)
    center32: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Precomputed once: the renderer uses them for every primitive of every image.
        a = np.diag(1.0 / np.asarray(self.radii, dtype=np.float64)) @ self.axes.T
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "quad", a.T @ a)
        object.__setattr__(self, "center32", np.asarray(self.center, dtype=np.float32))


@dataclass(frozen=True, eq=False)
class Detail:
    """An identity-specific mark on the head surface (head-frame mm).

    ``points``: mole/birthmark [[surface point]], scar [[end], [end]] (surface points),
    freckles [[band centre], [grating frequencies], [phases]], glasses [[eye dx, eye y, rim
    half-width]].
    """

    kind: Literal["mole", "freckles", "scar", "birthmark", "glasses"]
    points: np.ndarray  # [K,3], meaning per kind (above)
    radius: float
    color: tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class Identity:
    """One synthetic person: geometry (head frame, mm, y up, z to the viewer) and appearance."""

    head: tuple[Ellipsoid, ...]  # skull, jaw, nose bridge, tip, 2 alae, lips, 2 ears, hair...
    creases: tuple[tuple[int, int], ...]  # head primitive pairs whose crease is smoothed
    body: tuple[Ellipsoid, ...]
    landmarks_3d: np.ndarray  # [5,3]: image-left eye, image-right eye, nose tip, mouth corners
    skull_center: np.ndarray
    eye: tuple[float, float, float, float, float]  # dx, y, half-width, half-height, iris radius
    brow: tuple[float, float, float]  # gap above the eye, thickness, arch
    mouth: tuple[float, float, float]  # corner dx, y, lip half-height
    nose_tip: np.ndarray
    skin: np.ndarray
    iris: np.ndarray
    hair: np.ndarray
    lip: np.ndarray
    cloth: np.ndarray
    hairline: tuple[float, float, float, float, float, float]  # front, side, back, amp, freq, ph
    beard: float
    details: tuple[Detail, ...]


_SKIN_RAMP = np.array(
    [
        [0.98, 0.85, 0.76],
        [0.93, 0.76, 0.64],
        [0.80, 0.60, 0.46],
        [0.62, 0.43, 0.30],
        [0.44, 0.29, 0.20],
        [0.36, 0.24, 0.17],
    ]
)
_IRIS = np.array(
    [
        [0.40, 0.24, 0.12],
        [0.18, 0.11, 0.06],
        [0.25, 0.48, 0.80],
        [0.30, 0.58, 0.32],
        [0.58, 0.46, 0.18],
        [0.55, 0.62, 0.68],
    ]
)
_HAIR = np.array(
    [
        [0.05, 0.04, 0.04],
        [0.20, 0.12, 0.07],
        [0.40, 0.25, 0.13],
        [0.55, 0.22, 0.09],
        [0.88, 0.74, 0.45],
        [0.72, 0.72, 0.72],
        [0.78, 0.36, 0.14],
    ]
)
_GLASSES = np.array([[0.05, 0.05, 0.05], [0.35, 0.18, 0.08], [0.65, 0.10, 0.12], [0.1, 0.2, 0.6]])


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def make_identity(rng: np.random.Generator) -> Identity:
    """Draw one identity; all randomness comes from ``rng`` so a seed fixes the person."""
    skull_c = np.array([0.0, 10.0, 0.0])
    skull_r = np.array([_u(rng, 68, 80), _u(rng, 96, 108), _u(rng, 86, 96)])
    jaw_r = np.array([_u(rng, 58, 68), _u(rng, 56, 68), _u(rng, 58, 68)])
    jaw_c = np.array([0.0, _u(rng, -56, -46), 88.0 - jaw_r[2] + _u(rng, -2, 2)])
    skull = Ellipsoid(skull_c, skull_r, SKIN)
    jaw = Ellipsoid(jaw_c, jaw_r, SKIN)
    skin_prims = [skull, jaw]
    # Proportions around the ArcFace 5-point layout (the average frontal face) at 63 mm IPD:
    # nose tip ~36 mm below the eyes, mouth corners ~36 mm below the nose tip, ~52 mm apart.
    eye_dx, eye_y = _u(rng, 29, 34), _u(rng, 4, 10)
    tip_y = eye_y - _u(rng, 31, 40)
    mouth_dx, mouth_y = _u(rng, 22, 29), tip_y - _u(rng, 31, 40)
    nose = _nose(skin_prims, eye_y, tip_y, _u(rng, 17, 25), _u(rng, 8, 11))
    lip_h = _u(rng, 5, 8)
    lips_z = _front_z(skin_prims, 0.0, mouth_y) - lip_h + _u(rng, 1.5, 3.5)
    lips = Ellipsoid(np.array([0.0, mouth_y, lips_z]), np.array([mouth_dx, lip_h + 1, lip_h]), LIPS)
    ears = _ears(skull, eye_y, rng)
    hair_shell = Ellipsoid(
        skull_c + np.array([0.0, _u(rng, 2, 8), _u(rng, -8, -2)]),
        skull_r * _u(rng, 1.05, 1.11) + np.array([_u(rng, 0, 6), 0.0, 0.0]),
        HAIR,
    )
    head = [skull, jaw, *nose, lips, *ears, hair_shell]
    long_hair = rng.random() < 0.35
    if long_hair:
        head.append(_long_hair(skull_c, skull_r, rng))
    solid = tuple(p for p in head if p.material != HAIR)
    lm3d = _landmarks(solid, eye_dx, eye_y, nose[1], mouth_dx, mouth_y)
    skin = _pick_ramp(_SKIN_RAMP, rng) + rng.uniform(-0.03, 0.03, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] * _u(rng, 0.85, 1.1)
    return Identity(
        head=tuple(head),
        creases=_CREASES,
        body=_body(rng),
        landmarks_3d=lm3d,
        skull_center=skull_c,
        eye=(eye_dx, eye_y, _u(rng, 11, 14), _u(rng, 5, 7), _u(rng, 4.5, 5.5)),
        brow=(_u(rng, 9, 14), _u(rng, 3, 5.5), _u(rng, 1, 5)),
        mouth=(mouth_dx, mouth_y, lip_h),
        nose_tip=lm3d[2],
        skin=np.clip(skin, 0.05, 1.0),
        iris=_IRIS[rng.integers(len(_IRIS))] * _u(rng, 0.85, 1.15),
        hair=np.clip(hair, 0.0, 1.0),
        lip=np.clip(skin * (1 - _u(rng, 0.2, 0.5)) + np.array([0.55, 0.1, 0.15]) * 0.45, 0, 1),
        cloth=rng.uniform(0.1, 0.9, 3),
        hairline=_hairline(rng, long_hair),
        beard=_u(rng, 0.45, 0.85) if rng.random() < 0.25 else 0.0,
        details=_details(rng, solid, eye_dx, eye_y, mouth_y),
    )


# Indices into Identity.head (order fixed by make_identity): skull 0, jaw 1, bridge 2, tip 3.
# Only these creases are smoothed: smoothing the nose into the face makes it read as a blob.
_CREASES = ((0, 1), (2, 3))


def _pick_ramp(ramp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pos = rng.uniform(0, len(ramp) - 1)
    i = min(int(pos), len(ramp) - 2)
    return ramp[i] + (ramp[i + 1] - ramp[i]) * (pos - i)


def _tilted(center: np.ndarray, radii: np.ndarray, material: int, tilt_deg: float) -> Ellipsoid:
    """Ellipsoid rotated about the head's x axis (positive tilts its +y end towards +z)."""
    a = math.radians(tilt_deg)
    c, s = math.cos(a), math.sin(a)
    axes = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)
    return Ellipsoid(center, radii, material, axes)


def _nose(
    skin: list[Ellipsoid], eye_y: float, tip_y: float, protrude: float, width: float
) -> list[Ellipsoid]:
    """A bridge ellipsoid from the root between the eyes to a rounder tip (the landmark)."""
    root = np.array([0.0, eye_y + 2.0, _front_z(skin, 0.0, eye_y + 2.0) - 4.0])
    tip_r = np.array([width, 0.8 * width, 0.8 * width])
    tip_c = np.array([0.0, tip_y, _front_z(skin, 0.0, tip_y) + protrude - tip_r[2]])
    vec = tip_c + np.array([0.0, 0.0, tip_r[2] * 0.5]) - root
    length = float(np.linalg.norm(vec))
    tilt = -math.degrees(math.atan2(vec[2], -vec[1]))
    bridge_r = np.array([0.62 * width, 0.5 * length + 2.0, 0.55 * width])
    bridge = _tilted(root + 0.5 * vec, bridge_r, SKIN, tilt)
    ala_r = np.array([0.55, 0.5, 0.6]) * width
    alae = []
    for side in (-1.0, 1.0):
        x, y = side * 0.8 * width, tip_y - 2.0
        z = _front_z(skin, x, y) + 0.45 * protrude - ala_r[2]
        alae.append(Ellipsoid(np.array([x, y, z]), ala_r, SKIN))
    return [bridge, Ellipsoid(tip_c, tip_r, NOSE), *alae]


def _ears(skull: Ellipsoid, eye_y: float, rng: np.random.Generator) -> list[Ellipsoid]:
    r = np.array([7.0, _u(rng, 24, 32), _u(rng, 14, 18)])
    y, z = eye_y - _u(rng, 10, 16), _u(rng, -14, -4)
    x = skull.radii[0] * math.sqrt(max(0.0, 1 - ((y - skull.center[1]) / skull.radii[1]) ** 2))
    x *= math.sqrt(max(0.0, 1 - (z / skull.radii[2]) ** 2))
    return [Ellipsoid(np.array([s * (x - 1.0), y, z]), r, EAR) for s in (-1.0, 1.0)]


def _long_hair(skull_c: np.ndarray, skull_r: np.ndarray, rng: np.random.Generator) -> Ellipsoid:
    """A hair volume hanging behind the head and neck (reads as long hair from the side)."""
    c = skull_c + np.array([0.0, -_u(rng, 55, 80), -_u(rng, 30, 45)])
    r = np.array([skull_r[0] * _u(rng, 1.05, 1.2), _u(rng, 85, 110), skull_r[2] * 0.7])
    return Ellipsoid(c, r, HAIR)


def _body(rng: np.random.Generator) -> tuple[Ellipsoid, ...]:
    """Neck and shoulders in the unrotated body frame (the head turns, the torso does not)."""
    neck = Ellipsoid(
        np.array([0.0, -125.0, -12.0]), np.array([_u(rng, 42, 52), 80.0, _u(rng, 42, 50)]), NECK
    )
    torso = Ellipsoid(
        np.array([0.0, -265.0, -25.0]), np.array([_u(rng, 170, 200), 95.0, 105.0]), CLOTH
    )
    return (neck, torso)


def _hairline(rng: np.random.Generator, long_hair: bool) -> tuple[float, ...]:
    front = _u(rng, 50, 68) if rng.random() > 0.1 else _u(rng, 80, 95)  # a few receding
    side = _u(rng, -45, -25) if long_hair else _u(rng, -5, 20)
    back = _u(rng, -110, -90) if long_hair else _u(rng, -70, -45)
    return (front, side, back, _u(rng, 0, 9), float(rng.integers(3, 9)), _u(rng, 0, 2 * math.pi))


def _details(
    rng: np.random.Generator,
    solid: tuple[Ellipsoid, ...],
    eye_dx: float,
    eye_y: float,
    mouth_y: float,
) -> tuple[Detail, ...]:
    """One or two identity-specific marks at identity-specific places on the face surface."""
    kinds = ["mole", "freckles", "scar", "birthmark", "glasses"]
    chosen = rng.choice(len(kinds), size=int(rng.integers(1, 3)), replace=False)
    out = []
    for k in sorted(int(i) for i in chosen):
        kind = kinds[k]
        spot = _free_spot(rng, eye_dx, eye_y, mouth_y)
        if kind == "mole":
            pts, radius, color = _surface(solid, [spot]), _u(rng, 3.5, 5.0), (0.18, 0.10, 0.07)
        elif kind == "freckles":  # centre, grating frequencies (1/mm), phases
            pts = [[0.0, eye_y - 22, 0.0], rng.uniform(0.7, 1.1, 3), rng.uniform(0, 6.3, 3)]
            radius, color = 0.0, (0.45, 0.25, 0.12)
        elif kind == "scar":
            ang = rng.uniform(0, math.pi)
            d = np.array([math.cos(ang), math.sin(ang)]) * _u(rng, 12, 20)
            pts = _surface(solid, [spot - d, spot + d])
            radius, color = _u(rng, 1.6, 2.4), (0.92, 0.55, 0.55)
        elif kind == "birthmark":
            pts, radius, color = _surface(solid, [spot]), _u(rng, 8, 12), (0.62, 0.28, 0.22)
        else:
            pts = np.array([[eye_dx, eye_y, _u(rng, 15, 19)]])  # half-sizes of the rims
            radius, color = _u(rng, 1.8, 2.6), tuple(_GLASSES[rng.integers(len(_GLASSES))])
        out.append(Detail(kind, np.asarray(pts, dtype=np.float64), radius, color))
    return tuple(out)


def _free_spot(rng: np.random.Generator, eye_dx: float, eye_y: float, mouth_y: float) -> np.ndarray:
    """A face point away from the eyes, nose and mouth, so the mark stays visible."""
    for _ in range(100):
        x, y = rng.uniform(-52, 52), rng.uniform(mouth_y - 25, eye_y + 40)
        near_eye = abs(abs(x) - eye_dx) < 18 and abs(y - eye_y) < 14
        near_nose = abs(x) < 16 and mouth_y + 10 < y < eye_y + 5
        near_mouth = abs(x) < 32 and abs(y - mouth_y) < 12
        if not (near_eye or near_nose or near_mouth):
            return np.array([x, y])
    return np.array([45.0, mouth_y + 15.0])


# --------------------------------------------------------------------------------------------
# Ray casting
# --------------------------------------------------------------------------------------------


def _lin(p: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """``mat @ p`` for points stored as [3,N] (contiguous rows; BLAS is slow for 3 x N)."""
    m = np.asarray(mat, dtype=np.float32)
    x, y, z = p
    out = np.empty_like(p)
    for i in range(3):
        out[i] = x * m[i, 0] + y * m[i, 1] + z * m[i, 2]
    return out


def _solve(a: np.ndarray, b: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Roots of ``a t^2 + 2 b t + c = 0``: (entry, exit), inf where the ray misses."""
    disc = b * b - a * c
    hit = disc > 0
    sq = np.sqrt(np.where(hit, disc, 0.0))
    inv = 1.0 / a
    return np.where(hit, (-b - sq) * inv, np.inf), np.where(hit, (-b + sq) * inv, np.inf)


def _cast_list(
    prims: tuple[Ellipsoid, ...], origin: np.ndarray, dirs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit (t, primitive index or -1) of a few arbitrary rays (geometry set-up)."""
    best = np.full(len(dirs), np.inf)
    idx = np.full(len(dirs), -1)
    for k, e in enumerate(prims):
        ed = dirs @ e.a.T
        q = e.a @ (origin - e.center)
        t_in, _ = _solve((ed * ed).sum(1), ed @ q, float(q @ q) - 1.0)
        closer = (t_in > 0) & (t_in < best)
        best[closer], idx[closer] = t_in[closer], k
    return best, idx


@dataclass(frozen=True, eq=False)
class _Grid:
    """The supersampled camera rays of one image, expressed in one frame (head or body).

    Ray directions are linear in the pixel coordinates, so every ellipsoid's quadratic is
    built from two 1D coordinate vectors by broadcasting, over the primitive's own window.
    """

    g: np.ndarray  # [S] normalised camera coordinate (x - c) / f of subpixel columns (= rows)
    to_frame: np.ndarray  # [3,3] camera direction -> frame direction
    origin: np.ndarray  # [3] camera centre in the frame
    frame_rot: np.ndarray  # [3,3] rotation placing the frame in the camera (head_to_camera)
    trans: np.ndarray  # [3]
    px: int

    def dirs(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Frame directions [3,N] of the rays through subpixels (rows, cols)."""
        gx, gy, m = self.g[cols], self.g[rows], self.to_frame.astype(np.float32)
        return np.stack([m[i, 0] * gx + m[i, 1] * gy + m[i, 2] for i in range(3)])

    def points(self, rows: np.ndarray, cols: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Frame points [3,N] at depth ``t`` along those rays."""
        return self.origin.astype(np.float32)[:, None] + t[None, :] * self.dirs(rows, cols)


_SIGNS = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T


def _make_grid(px: int, to_frame_rot: np.ndarray, trans: np.ndarray) -> _Grid:
    """Rays for a frame whose points map to the camera as ``FLIP @ rot @ p + trans``."""
    j = np.arange(px * SUPERSAMPLE, dtype=np.float64)
    g = (((j + 0.5) / SUPERSAMPLE - 0.5 - px / 2.0) / px).astype(np.float32)
    to_frame = to_frame_rot.T @ FLIP
    return _Grid(g, to_frame, to_frame @ (-trans), to_frame_rot, trans, px)


def _window(e: Ellipsoid, grid: _Grid) -> tuple[int, int, int, int] | None:
    """Subpixel rows/cols (r0, r1, c0, c1) bounding the exact projected outline of ``e``.

    An image line ``u = u0`` is tangent to the silhouette when its plane through the camera,
    normal ``n = (f, 0, cx - u0)``, satisfies ``(n . c)^2 = n^T M M^T n`` (support function
    of the ellipsoid ``c + M s``): a quadratic in ``u0`` (likewise for rows). Much tighter than
    projecting the corners of a bounding box, which perspective inflates ~2x in area.
    """
    rot_cam = FLIP @ grid.frame_rot
    c = rot_cam @ e.center + grid.trans
    m = rot_cam @ e.axes @ np.diag(e.radii)
    cov = m @ m.T
    f = float(grid.px)
    half = grid.px / 2.0
    size = grid.g.size
    bounds = []
    for axis in (1, 0):  # rows (v, camera y) then columns (u, camera x)
        qa = c[2] ** 2 - cov[2, 2]
        qb = f * (c[axis] * c[2] - cov[axis, 2])
        qc = f * f * (c[axis] ** 2 - cov[axis, axis])
        disc = qb * qb - qa * qc
        if qa <= 1e-9 or disc < 0:  # camera inside or too close: no finite outline
            bounds.append((0, size))
            continue
        roots = [(-qb - math.sqrt(disc)) / qa, (-qb + math.sqrt(disc)) / qa]
        lo_px, hi_px = sorted(half - w for w in roots)
        lo = math.floor(lo_px * SUPERSAMPLE + (SUPERSAMPLE - 1) / 2.0) - 1
        hi = math.ceil(hi_px * SUPERSAMPLE + (SUPERSAMPLE - 1) / 2.0) + 2
        bounds.append((max(lo, 0), min(hi, size)))
    (r0, r1), (c0, c1) = bounds
    return (r0, r1, c0, c1) if c1 > c0 and r1 > r0 else None


def _intersect_grid(
    e: Ellipsoid, grid: _Grid, win: tuple[int, int, int, int], want_exit: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Entry (and optionally exit) depths [h,w] of the window's rays with ``e`` (inf: missed).

    With ray direction ``D = M (gx, gy, 1)`` the quadratic's coefficients are polynomials in
    (gx, gy): ``a`` needs one outer product and ``b`` is separable, so a window costs ~15
    vector operations.
    """
    r0, r1, c0, c1 = win
    gm = e.a @ grid.to_frame  # rows: (alpha, beta, gamma) per unit-sphere axis
    q = e.a @ (grid.origin - e.center)
    al, be, ga = gm[:, 0], gm[:, 1], gm[:, 2]
    gx, gy = grid.g[c0:c1].astype(np.float64), grid.g[r0:r1].astype(np.float64)
    ax = (al @ al) * gx * gx + 2 * (al @ ga) * gx
    ay = (be @ be) * gy * gy + 2 * (be @ ga) * gy + ga @ ga
    f32 = np.float32
    a = ay.astype(f32)[:, None] + ax.astype(f32)[None, :]
    a += (2 * (al @ be) * gy).astype(f32)[:, None] * gx.astype(f32)[None, :]
    b = ((q @ be) * gy + q @ ga).astype(f32)[:, None] + ((q @ al) * gx).astype(f32)[None, :]
    disc = b * b
    disc -= a * f32(q @ q - 1.0)
    miss = disc <= 0
    sq = np.sqrt(np.maximum(disc, 0, out=disc), out=disc)
    inv = np.reciprocal(a, out=a)
    t_in = -(b + sq) * inv
    t_in[miss] = np.inf
    if not want_exit:
        return t_in, None
    t_out = (sq - b) * inv
    t_out[miss] = np.inf
    return t_in, t_out


def _cast_grid(
    prims: tuple[Ellipsoid, ...],
    grid: _Grid,
    keep: Callable[..., np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-buffered union of ellipsoids: depth, primitive index (-1: none), back-face flag [S,S].

    HAIR primitives are cut by ``keep`` (the hairline): where the entry point is not hair the
    ray continues and may see the inside of the hair shell (the back-face flag).
    """
    size = grid.g.size
    best = np.full((size, size), np.inf, dtype=np.float32)
    idx = np.full((size, size), -1, dtype=np.int16)
    back = np.zeros((size, size), dtype=bool)
    for k, e in enumerate(prims):
        win = _window(e, grid)
        if win is None:
            continue
        cut = e.material == HAIR and keep is not None
        t_in, t_out = _intersect_grid(e, grid, win, want_exit=cut)
        inner = None
        if cut:
            t_in, inner = _cut_hair(t_in, t_out, grid, win, keep)
        sl = np.s_[win[0] : win[1], win[2] : win[3]]
        closer = t_in < best[sl]
        np.copyto(best[sl], t_in, where=closer)
        np.copyto(idx[sl], k, where=closer)
        if inner is not None:
            np.copyto(back[sl], inner, where=closer)
        else:
            np.copyto(back[sl], False, where=closer)
    return best, idx, back


def _cut_hair(
    t_in: np.ndarray,
    t_out: np.ndarray,
    grid: _Grid,
    win: tuple[int, int, int, int],
    keep: Callable[..., np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Hair-shell depth where its entry (or, seen through the face opening, exit) is hair."""
    hit = np.isfinite(t_in)
    r0, r1, c0, c1 = win
    m = grid.to_frame.astype(np.float32)
    gx, gy = grid.g[None, c0:c1], grid.g[r0:r1, None]
    dirs = [m[k, 0] * gx + (m[k, 1] * gy + m[k, 2]) for k in range(3)]
    o = grid.origin.astype(np.float32)

    def hair_at(t: np.ndarray) -> np.ndarray:
        t = np.where(hit, t, np.float32(0.0))
        return keep(*(o[k] + t * dirs[k] for k in range(3)))

    front_ok = hit & hair_at(t_in)
    back_ok = hit & ~front_ok & hair_at(t_out)
    t = np.where(front_ok, t_in, np.where(back_ok, t_out, np.float32(np.inf)))
    return t, back_ok


def _norm3(v: np.ndarray) -> np.ndarray:
    """Norms of [3,N] vectors."""
    return np.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


def _normals(
    prims: tuple[Ellipsoid, ...], bounds: np.ndarray, p: np.ndarray, creases: tuple = ()
) -> np.ndarray:
    """Unit normals [3,N] at surface points ``p`` [3,N], which are sorted by primitive
    (``p[:, bounds[k]:bounds[k+1]]`` lie on ``prims[k]``), so every step works on views.

    A plain union of ellipsoids has hard creases (skull/jaw, nose/face); for each crease pair
    the points of one primitive near the other's surface get the other's unit gradient added
    with weight ``exp(-distance / CREASE_MM)``. Doing it on both sides keeps the normal
    continuous across the crease.
    """
    n = np.empty_like(p)
    for k, e in enumerate(prims):
        lo, hi = bounds[k], bounds[k + 1]
        if hi > lo:
            g = _lin(p[:, lo:hi] - e.center32[:, None], e.quad)
            n[:, lo:hi] = g / np.maximum(_norm3(g), 1e-9)
    for i, j in creases:
        _blend(n, p, bounds[i], bounds[i + 1], prims[j])
        _blend(n, p, bounds[j], bounds[j + 1], prims[i])
    return n / np.maximum(_norm3(n), 1e-9)


def _blend(n: np.ndarray, p: np.ndarray, lo: int, hi: int, e: Ellipsoid) -> None:
    """Add ``e``'s unit gradient to points lo:hi near its surface (in place)."""
    if hi <= lo:
        return
    margin = 3 * CREASE_MM
    ext = np.abs(e.axes) @ e.radii + margin
    b0, b1 = (e.center - ext).astype(np.float32), (e.center + ext).astype(np.float32)
    x, y, z = p[:, lo:hi]
    box = (x > b0[0]) & (x < b1[0]) & (y > b0[1]) & (y < b1[1]) & (z > b0[2]) & (z < b1[2])
    sel = np.flatnonzero(box)
    if sel.size == 0:
        return
    sel += lo
    local = _lin(p[:, sel] - e.center32[:, None], e.a)  # unit-sphere coordinates
    dist = (_norm3(local) - 1.0) * float(e.radii.min())  # ~ mm outside the primitive
    g = _lin(local, e.a.T)
    w = np.exp(-np.maximum(dist, 0) / CREASE_MM) / np.maximum(_norm3(g), 1e-9)
    n[:, sel] += g * w


def _front_z(prims: list[Ellipsoid] | tuple[Ellipsoid, ...], x: float, y: float) -> float:
    """Head-frame z of the surface seen from straight ahead at (x, y)."""
    return float(_surface(prims, [[x, y]])[0, 2])


def _surface(prims: Any, xy: Any) -> np.ndarray:
    """Surface points hit by rays travelling along -z at head-frame (x, y) positions."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    out = np.zeros((len(xy), 3))
    for i, (x, y) in enumerate(xy):
        t, idx = _cast_list(tuple(prims), np.array([x, y, 1000.0]), np.array([[0.0, 0.0, -1.0]]))
        out[i] = (x, y, 1000.0 - float(t[0]) if idx[0] >= 0 else 0.0)
    return out


def _landmarks(
    solid: tuple[Ellipsoid, ...],
    eye_dx: float,
    eye_y: float,
    tip: Ellipsoid,
    mouth_dx: float,
    mouth_y: float,
) -> np.ndarray:
    """The 5 InsightFace points as head-frame surface points (index 0 at head-frame -x)."""
    xy = [
        [-eye_dx, eye_y],
        [eye_dx, eye_y],
        [0.0, float(tip.center[1])],
        [-mouth_dx, mouth_y],
        [mouth_dx, mouth_y],
    ]
    return _surface(solid, xy)


# --------------------------------------------------------------------------------------------
# Texture and shading (points and colours are planar [3,N] arrays, all masks element-wise)
# --------------------------------------------------------------------------------------------


def _hair_mask(ident: Identity, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """True where a head-frame point lies above the identity's hairline (front/side/back)."""
    cx, cy, cz = (float(v) for v in ident.skull_center)
    qx, qy, qz = x - cx, y - cy, z - cz
    front, side, back, amp, freq, phase = ident.hairline
    c = qz / np.sqrt(np.maximum(qx * qx + qz * qz, 1e-6))  # cos of the azimuth
    cf = np.maximum(c, 0.0)
    h = np.where(c >= 0, side + (front - side) * cf * np.sqrt(cf), side + (back - side) * (-c))
    h += (amp * np.sin(qx * (freq / 70.0) + phase)) * cf  # fringe waves along the forehead
    return qy > h


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float):
    u, v = (x - cx) * (1.0 / rx), (y - cy) * (1.0 / ry)
    return u * u + v * v


def _paint(col: np.ndarray, mask: np.ndarray, color: Any, amount: float = 1.0) -> None:
    """Blend ``color`` into the planar colours ``col`` [3,N] where ``mask``, in place."""
    c = np.asarray(color, dtype=np.float32).reshape(3, 1)
    np.copyto(col, col + (c - col) * np.float32(amount), where=mask[None, :])


def _albedo(ident: Identity, p: np.ndarray, mat: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Surface colour [3,N] (sRGB, 0..1) from the head-frame point: the face is a texture."""
    skin = ident.skin
    palette = np.array(
        [skin, ident.hair, ident.lip, skin * [1.0, 0.9, 0.88], skin * 0.8, ident.cloth, skin],
        dtype=np.float32,
    )
    col = np.take(palette.T, mat, axis=1)
    x, y, z = p
    ax = np.abs(x)
    skinlike = (mat == SKIN) | (mat == NOSE) | (mat == LIPS)
    _face_texture(ident, col, skinlike & (z > 25), ax, y, mat)
    hair = mat == HAIR
    if hair.any():
        col *= np.where(hair, _hair_streaks(ident, x, y, z), np.float32(1.0))
    if back.any():
        col *= np.where(back, np.float32(0.45), np.float32(1.0))
    head = (mat != NECK) & (mat != CLOTH)
    for d in ident.details:
        _detail(d, col, p, ax, skinlike, head)
    return col


def _hair_streaks(ident: Identity, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Brightness ripples along the hair: shows the hair's rotation, not a flat cap."""
    cx, cy, cz = (float(v) for v in ident.skull_center)
    theta = np.arctan2(x - cx, z - cz)
    return 0.93 + 0.07 * np.sin(theta * 31.0 + (y - cy) * 0.05 + ident.hairline[5])


def _face_texture(
    ident: Identity,
    col: np.ndarray,
    face: np.ndarray,
    ax: np.ndarray,
    y: np.ndarray,
    mat: np.ndarray,
) -> None:
    """Features painted on the front of the head, mirrored in x (``ax = |x|``)."""
    edx, ey, ew, eh, ir = ident.eye
    mdx, my, lh = ident.mouth
    # Soft cheeks and a shadow around the eye sockets make the face read at low resolution.
    cheek = face & (_ellipse(ax, y, edx + 6, ey - 30, 18, 14) < 1)
    _paint(col, cheek, ident.skin * np.array([1.02, 0.86, 0.84]), 0.5)
    socket = face & (_ellipse(ax, y, edx, ey + 1, ew * 1.45, eh * 2.1) < 1)
    _paint(col, socket, ident.skin * 0.8, 0.55)
    _beard(ident, col, face & (mat == SKIN), ax, y)
    mouth_line = (mat == LIPS) & (np.abs(y - my) < 1.0) & (ax < mdx * 0.92)
    _paint(col, mouth_line, ident.lip * 0.35)
    tip_y = float(ident.nose_tip[1])
    nostril = (mat == NOSE) & (y < tip_y - 3) & (_ellipse(ax, y, 5.0, tip_y - 6, 3.5, 3) < 1)
    _paint(col, nostril, (0.12, 0.06, 0.05), 0.85)
    _eyes(ident, col, face, ax, y)
    gap, thick, arch = ident.brow
    t = (ax - edx) * (1.0 / (ew * 1.35))
    brow_y = ey + eh + gap + arch * (1 - t * t) - 2.0 * t
    brow = face & (np.abs(t) < 1) & (np.abs(y - brow_y) < thick * (1 - 0.5 * t * t))
    _paint(col, brow, ident.hair * 0.6 + 0.04, 0.9)


def _eyes(ident: Identity, col: np.ndarray, face: np.ndarray, ax: np.ndarray, y: np.ndarray):
    """Almond sclera with upper lid line, coloured iris and pupil (painted looking ahead)."""
    edx, ey, ew, eh, ir = ident.eye
    e = _ellipse(ax, y, edx, ey, ew, eh)
    _paint(col, face & (e < 1.35) & (y > ey), (0.12, 0.08, 0.07), 0.8)
    inside = face & (e < 1)
    _paint(col, inside, (0.93, 0.91, 0.88))
    r2 = _ellipse(ax, y, edx, ey, ir, ir)
    _paint(col, inside & (r2 < 1), ident.iris)
    _paint(col, inside & (r2 < 0.2), (0.03, 0.03, 0.03))


def _beard(ident: Identity, col: np.ndarray, skin: np.ndarray, ax: np.ndarray, y: np.ndarray):
    if ident.beard <= 0:
        return
    mdx, my, lh = ident.mouth
    moustache = (np.abs(y - (my + lh + 4)) < 4) & (ax < mdx + 4)
    chin = (y < my - lh - 1) & (ax < mdx + 30)
    _paint(col, skin & (moustache | chin), ident.hair * 0.8, ident.beard)


def _detail(
    d: Detail, col: np.ndarray, p: np.ndarray, ax: np.ndarray, skin: np.ndarray, head: np.ndarray
) -> None:
    """Paint one identity mark onto the skin (glasses: onto anything on the head)."""
    if d.kind == "glasses":
        _glasses(d, col, p, ax, head)
        return
    if d.kind == "freckles":
        _freckles(d, col, p, skin)
        return
    pts = d.points.astype(np.float32)
    rel = p - pts[0][:, None]
    if d.kind == "scar":
        ab = pts[1] - pts[0]
        s = (rel[0] * ab[0] + rel[1] * ab[1] + rel[2] * ab[2]) * (1.0 / float(ab @ ab))
        rel = rel - np.clip(s, 0, 1)[None, :] * ab[:, None]
    dist2 = rel[0] * rel[0] + rel[1] * rel[1] + rel[2] * rel[2]
    amount = {"birthmark": 0.6, "scar": 0.75}.get(d.kind, 0.9)
    _paint(col, skin & (dist2 < d.radius**2), d.color, amount)


def _freckles(d: Detail, col: np.ndarray, p: np.ndarray, skin: np.ndarray) -> None:
    """Quasi-random spots (thresholded sum of three skew sine gratings) in a cheek band."""
    (cx, cy, _), (f1, f2, f3), (ph1, ph2, ph3) = d.points
    x, y, z = p
    v = np.sin(f1 * x + ph1) + np.sin(f2 * (y + 0.6 * x) + ph2) + np.sin(f3 * (y - 0.7 * x) + ph3)
    band = skin & (z > 40) & (_ellipse(x, y, cx, cy, 48, 17) < 1)
    _paint(col, band & (v > 2.2), d.color, 0.65)


def _glasses(d: Detail, col: np.ndarray, p: np.ndarray, ax: np.ndarray, head: np.ndarray):
    """Painted frames: two rims, a bridge and temples running back towards the ears."""
    edx, ey, rw = (float(v) for v in d.points[0])
    rh = rw * 0.72
    _, y, z = p
    e = np.sqrt(_ellipse(ax, y, edx, ey + 1, rw, rh))
    w = d.radius / rh
    rim = (z > 20) & (np.abs(e - 1) < w)
    bridge = (z > 40) & (ax < edx - rw + 1) & (np.abs(y - ey - rh * 0.35) < d.radius * 0.6)
    temple = (ax > edx + rw * 0.9) & (z > -25) & (np.abs(y - ey - 3) < d.radius * 0.6)
    _paint(col, head & (z > 20) & (e < 1 - w), (0.75, 0.85, 0.95), 0.12)
    _paint(col, head & (rim | bridge | temple), d.color, 0.95)


def _shade(
    albedo: np.ndarray, normals: np.ndarray, light_dir: np.ndarray, light: Lighting, wrap: float
) -> np.ndarray:
    """Wrapped Lambert + ambient in linear light (gamma 2: cheap, close to sRGB) -> [3,N]."""
    lx, ly, lz = (float(v) for v in light_dir)
    ndl = normals[0] * lx + normals[1] * ly + normals[2] * lz
    ndl = np.clip((ndl + wrap) * (1.0 / (1 + wrap)), 0, 1)
    color = np.asarray(light.color, dtype=np.float32)[:, None]
    rad = light.ambient * (0.6 + 0.4 * color) + light.diffuse * color * ndl[None, :]
    return np.sqrt(np.clip(albedo * albedo * rad, 0, 1))


# --------------------------------------------------------------------------------------------
# Background
# --------------------------------------------------------------------------------------------


def render_background(bg: Background, image_px: int) -> np.ndarray:
    """Background image float32 [H,W,3] in 0..1 (plain gradient or seeded clutter)."""
    ramp = np.linspace(0.0, 1.0, image_px, dtype=np.float32)[:, None, None]
    img = np.asarray(bg.top, np.float32) * (1 - ramp) + np.asarray(bg.bottom, np.float32) * ramp
    img = np.ascontiguousarray(np.broadcast_to(img, (image_px, image_px, 3)))
    if bg.kind == "cluttered":
        _clutter(img, bg, image_px)
        if bg.blur > 0:
            img = cv2.GaussianBlur(img, (0, 0), bg.blur)
    return img


def _clutter(img: np.ndarray, bg: Background, px: int) -> None:
    """Shelves, frames, windows and blobs, all shifted by the drift (the camera moves)."""
    rng = np.random.default_rng(bg.seed)
    dx, dy = bg.drift[0] * px, bg.drift[1] * px
    for _ in range(int(rng.integers(14, 24))):
        color = tuple(float(c) for c in rng.uniform(0.05, 0.95, 3))
        cx, cy = rng.uniform(-0.4, 1.4) * px + dx, rng.uniform(-0.2, 1.2) * px + dy
        w, h = rng.uniform(0.05, 0.5) * px, rng.uniform(0.05, 0.5) * px
        kind = rng.integers(4)
        p1 = (int(cx - w / 2), int(cy - h / 2))
        p2 = (int(cx + w / 2), int(cy + h / 2))
        if kind == 0:
            cv2.rectangle(img, p1, p2, color, -1)
        elif kind == 1:
            cv2.circle(img, (int(cx), int(cy)), int(w / 2), color, -1)
        elif kind == 2:
            cv2.rectangle(img, p1, p2, color, max(1, int(px / 60)))
        else:
            cv2.line(img, p1, p2, color, max(1, int(rng.uniform(1, px / 25))))


# --------------------------------------------------------------------------------------------
# Rendering one image
# --------------------------------------------------------------------------------------------


def render_face(
    identity: Identity,
    yaw: float,
    pitch: float,
    roll: float,
    lighting: Lighting | None = None,
    background: Background | None = None,
    image_px: int = 160,
    *,
    placement: Placement | None = None,
    landmark_rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image: (rgb uint8 [H,W,3], landmarks_2d [5,2], box [x1,y1,x2,y2]).

    Landmarks are the exact projections of ``identity.landmarks_3d`` (plus ~0.5 px noise when
    ``landmark_rng`` is given, like a detector); the box bounds the rendered head.
    """
    rgb, _, landmarks, box = _render(
        identity,
        yaw,
        pitch,
        roll,
        lighting or Lighting(),
        background or Background(),
        image_px,
        placement or Placement(),
    )
    if landmark_rng is not None:
        landmarks = landmarks + landmark_rng.normal(0.0, LANDMARK_NOISE_PX, landmarks.shape)
    return rgb, landmarks, box


def _render(
    ident: Identity,
    yaw: float,
    pitch: float,
    roll: float,
    light: Lighting,
    bg: Background,
    px: int,
    place: Placement,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Also returns the head coverage [H,W] in 0..1 (for tests and the box)."""
    rot = rotation_from_ypr(yaw, pitch, roll)
    trans = place.translation()
    landmarks = project(head_to_camera(ident.landmarks_3d, rot, trans), px, px)
    head = _make_grid(px, rot, trans)
    body = _make_grid(px, np.eye(3), trans)
    t_h, i_h, back = _cast_grid(ident.head, head, lambda x, y, z: _hair_mask(ident, x, y, z))
    t_b, i_b, _ = _cast_grid(ident.body, body)
    head_hit = t_h < t_b
    body_hit = t_b < t_h
    size = px * SUPERSAMPLE
    rgb = np.zeros((size * size, 3), dtype=np.float32)
    l_cam = np.asarray(light.direction, dtype=np.float64)
    l_cam = l_cam / np.linalg.norm(l_cam)
    for grid, prims, hit, idx, t, bk, pairs in (
        (head, ident.head, head_hit, i_h, t_h, back, ident.creases),
        (body, ident.body, body_hit, i_b, t_b, None, ()),
    ):
        flat = np.flatnonzero(hit)
        if flat.size:
            prim = idx.ravel()[flat]
            order = np.argsort(prim, kind="stable")  # group hits by primitive
            flat, prim = flat[order], prim[order]
            p = grid.points(flat // size, flat % size, t.ravel()[flat])
            b = None if bk is None else bk.ravel()[flat]
            rgb[flat] = _shade_hits(ident, prims, prim, b, p, grid.to_frame @ l_cam, light, pairs).T
    color = _downsample(rgb.reshape(size, size, 3), px)
    cover = _downsample((head_hit | body_hit).astype(np.float32), px)
    head_cover = _downsample(head_hit.astype(np.float32), px)
    out = render_background(bg, px) * (1 - cover[..., None]) + color
    rgb8 = np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return rgb8, head_cover, landmarks, _box(head_cover)


def _downsample(img: np.ndarray, px: int) -> np.ndarray:
    """Box-filter the supersampled buffer to the output size (the anti-aliasing)."""
    return cv2.resize(img, (px, px), interpolation=cv2.INTER_AREA)


def _shade_hits(
    ident: Identity,
    prims: tuple[Ellipsoid, ...],
    idx: np.ndarray,
    back: np.ndarray | None,
    p: np.ndarray,
    light_dir: np.ndarray,
    light: Lighting,
    pairs: tuple = (),
) -> np.ndarray:
    bounds = np.searchsorted(idx, np.arange(len(prims) + 1))
    normals = _normals(prims, bounds, p, pairs)
    back = np.zeros(idx.shape, dtype=bool) if back is None else back
    if back.any():
        normals *= np.where(back, np.float32(-1.0), np.float32(1.0))
    mat = np.array([e.material for e in prims], dtype=np.int16)[idx]
    albedo = _albedo(ident, p, mat, back)
    return _shade(albedo, normals, light_dir, light, wrap=0.35)


def _box(head_cover: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(head_cover > 0.5)
    if xs.size == 0:
        return np.zeros(4, dtype=np.float64)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Views: the ID photo and the phone video of one identity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """Everything that varies per image of one identity."""

    role: Literal["front", "video"]
    index: int
    yaw: float
    pitch: float
    roll: float
    lighting: Lighting
    background: Background
    placement: Placement
    noise: float  # sensor noise sigma, in 0..1 intensity units


_LIGHT_TINTS = np.array(
    [[1.0, 0.82, 0.62], [0.80, 0.90, 1.05], [1.0, 1.0, 1.0], [0.88, 1.0, 0.86], [1.05, 0.88, 0.95]]
)


def identity_rngs(seed: int, index: int) -> list[np.random.Generator]:
    """Independent streams (identity, views, landmark noise) keyed by (seed, identity index).

    Keying by index (not by draw order) keeps the output identical for any worker count.
    """
    children = np.random.SeedSequence([seed, index, 0x5F17]).spawn(3)
    return [np.random.default_rng(c) for c in children]


def person_name(index: int, num_identities: int) -> str:
    """``synth_0007``; with >= 6 identities one non-ASCII name and one with a space (quirks)."""
    if num_identities >= 6 and index == 3:
        return f"合成_{index:04d}"
    if num_identities >= 6 and index == 5:
        return f"synth {index:04d}"
    return f"synth_{index:04d}"


def front_view(rng: np.random.Generator) -> View:
    """A near-frontal ID photo: plain light background, even frontal light, sharp and clean."""
    yaw, pitch = rng.uniform(-4, 4, 2)
    tone = _u(rng, 0.84, 0.95)
    tint = rng.uniform(-0.03, 0.03, 3)
    top = tuple(float(v) for v in np.clip(tone + tint, 0, 1))
    bottom = tuple(float(v) for v in np.clip(tone - 0.06 + tint, 0, 1))
    return View(
        role="front",
        index=0,
        yaw=float(yaw),
        pitch=float(pitch),
        roll=_u(rng, -2, 2),
        lighting=Lighting((_u(rng, -0.08, 0.08), -0.3, -1.0), (1.0, 1.0, 0.98), 0.55, 0.55),
        background=Background("plain", top, bottom),
        placement=Placement(_u(rng, -5, 5), -15 + _u(rng, -5, 5), _u(rng, 340, 360)),
        noise=0.0,
    )


def video_views(rng: np.random.Generator, n: int) -> list[View]:
    """A phone video: smooth pose sweep (yaw ~ +-70, pitch ~ +-30, roll ~ +-20), moving light,
    cluttered background drifting with the camera, varying head placement and sensor noise."""
    t = np.arange(n, dtype=np.float64) / max(n, 1)
    ph = rng.uniform(0, 2 * math.pi, 12)
    tau = 2 * math.pi * t

    def wave(freq: float, wobble: float, p1: int, p2: int) -> np.ndarray:
        # A sine with a wobbling but monotonic phase (|wobble| * 3 < freq): smooth, irregular,
        # and it still reaches both extremes once per cycle, so the range is always covered.
        return np.sin(freq * tau + ph[p1] + wobble * np.sin(3 * tau + ph[p2]))

    yaw = _u(rng, 66, 72) * wave(1, 0.15, 0, 1)
    pitch = _u(rng, 24, 30) * wave(2, 0.5, 2, 3)
    roll = _u(rng, 15, 20) * wave(1, 0.25, 4, 5)
    lights = _video_lights(rng, tau, ph)
    bg_seed = int(rng.integers(2**31))
    top, bottom = rng.uniform(0.15, 0.85, 3), rng.uniform(0.1, 0.8, 3)
    blur, noise = _u(rng, 0.6, 1.5), _u(rng, 1.5, 3.0) / 255.0
    base_z = _u(rng, 335, 375)
    views = []
    for i in range(n):
        drift = (0.15 * math.sin(tau[i] + ph[8]), 0.05 * math.sin(2 * tau[i] + ph[9]))
        bg = Background("cluttered", tuple(top), tuple(bottom), bg_seed, drift, blur)
        place = Placement(
            15 * math.sin(tau[i] + ph[10]),
            -15 + 10 * math.sin(2 * tau[i] + ph[11]),
            base_z + 25 * math.sin(tau[i] + ph[6]),
        )
        views.append(View("video", i, yaw[i], pitch[i], roll[i], lights[i], bg, place, noise))
    return views


def _video_lights(rng: np.random.Generator, tau: np.ndarray, ph: np.ndarray) -> list[Lighting]:
    """Light direction sweeping around the face, colour and intensity drifting over the clip."""
    az0, swing = math.radians(_u(rng, -40, 40)), math.radians(_u(rng, 30, 60))
    tint = _LIGHT_TINTS[rng.integers(len(_LIGHT_TINTS))]
    gain, ambient = _u(rng, 0.75, 1.15), _u(rng, 0.22, 0.4)
    out = []
    for tt in tau:
        az = az0 + swing * math.sin(tt + ph[6])
        el = math.radians(25 + 15 * math.sin(2 * tt + ph[7]))
        direction = (math.sin(az) * math.cos(el), -math.sin(el), -math.cos(az) * math.cos(el))
        mix = 0.5 + 0.5 * math.sin(tt + ph[4])
        color = tuple(float(c) for c in (1 - mix) * tint + mix * np.ones(3))
        k = gain * (1 + 0.15 * math.sin(3 * tt + ph[5]))
        out.append(Lighting(direction, color, ambient * k, 0.8 * k))
    return out


def render_view(
    identity: Identity, view: View, image_px: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a view, with sensor noise and detector-like landmark noise from ``rng``."""
    rgb, lm, box = render_face(
        identity,
        view.yaw,
        view.pitch,
        view.roll,
        view.lighting,
        view.background,
        image_px,
        placement=view.placement,
        landmark_rng=rng,
    )
    if view.noise > 0:
        noise = rng.standard_normal(rgb.shape, dtype=np.float32)
        noise *= np.float32(view.noise * 255.0)
        noise += rgb
        noise += np.float32(0.5)
        rgb = np.clip(noise, 0, 255).astype(np.uint8)
    return rgb, lm, box


# --------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    """Encode in memory and write bytes (works for non-ASCII paths on every platform)."""
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _render_identity(args: tuple[SyntheticSpec, int, str]) -> dict[str, Any]:
    """Render and write one identity's images; returns plain data for the metadata (picklable)."""
    spec, index, root_s = args
    root = Path(root_s)
    name = person_name(index, spec.num_identities)
    id_rng, view_rng, noise_rng = identity_rngs(spec.seed, index)
    ident = make_identity(id_rng)
    views = [front_view(view_rng), *video_views(view_rng, spec.frames_per_identity)]
    images = []
    for view in views:
        rgb, lm, box = render_view(ident, view, spec.image_px, noise_rng)
        if view.role == "front":
            rel, frame = f"{FACE_DIR}/{name}.jpg", None
        else:
            frame = f"{name}frame_{view.index:06d}"
            rel = f"{VIDEO_DIR}/{name}/{frame}.jpg"
        _write_jpeg(root / rel, rgb)
        images.append(
            {
                "person_name": name,
                "role": view.role,
                "image_relpath": rel,
                "frame_index": frame,
                "yaw": float(view.yaw),
                "pitch": float(view.pitch),
                "roll": float(view.roll),
                "translation": view.placement.translation().tolist(),
                "landmarks_2d": np.round(lm, 4).tolist(),
                "box": box.tolist(),
            }
        )
    return {"person_name": name, "landmarks_3d": ident.landmarks_3d.tolist(), "images": images}


def _usable_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup-aware where the OS says so)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _map_identities(spec: SyntheticSpec, root: Path, num_workers: int) -> list[dict[str, Any]]:
    jobs = [(spec, i, str(root)) for i in range(spec.num_identities)]
    workers = max(1, min(num_workers, spec.num_identities, _usable_cpus()))
    if workers == 1:
        return [_render_identity(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: the caller may hold threads (Ray, torch, OpenCV) that make fork unsafe.
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            return list(pool.map(_render_identity, jobs))
    except BrokenProcessPool as exc:
        # e.g. a __main__ that spawn cannot re-import (stdin); the output does not depend on
        # the worker count, so rendering here gives the same bytes (or the real traceback).
        print(f"synthetic: worker processes failed ({exc}); rendering serially", flush=True)
        return [_render_identity(j) for j in jobs]


def render_dataset(root: Path, spec: SyntheticSpec, num_workers: int = 1) -> Path:
    """Render ``spec`` into the original layout under ``root``; returns ``root/train/datas/file``.

    Output bytes do not depend on ``num_workers`` (every identity has its own seed).
    """
    from controlnet_ray.data.layout import ImageRecord, write_legacy_dataset

    root = Path(root)
    people = _map_identities(spec, root, num_workers)
    records: dict[str, list[Any]] = {"front": [], "video": []}
    for person in people:
        for im in person["images"]:
            records[im["role"]].append(
                ImageRecord(
                    person_name=im["person_name"],
                    image_relpath=im["image_relpath"],
                    image_size=(spec.image_px, spec.image_px),
                    box=np.asarray(im["box"], dtype=np.float64),
                    landmarks_2d=np.asarray(im["landmarks_2d"], dtype=np.float64),
                    frame_index=im["frame_index"],
                )
            )
    data_dir = root / DATA_DIR
    write_legacy_dataset(data_dir, records["front"], records["video"], repo_root=root)
    _write_ground_truth(root, spec, people)
    return data_dir


def _write_ground_truth(root: Path, spec: SyntheticSpec, people: list[dict[str, Any]]) -> None:
    images = [
        im
        for role in ("front", "video")
        for p in people
        for im in p["images"]
        if im["role"] == role
    ]
    doc = {
        "render_version": RENDER_VERSION,
        "spec": dataclasses.asdict(spec),
        "convention": "controlnet_ray.data.geometry (degrees; focal = image width)",
        "head_frame": "mm; x viewer's right, y up, z to the viewer; origin at the skull centre",
        "landmark_order": ["left_eye", "right_eye", "nose_tip", "left_mouth", "right_mouth"],
        "persons": {p["person_name"]: {"landmarks_3d": p["landmarks_3d"]} for p in people},
        "images": images,
    }
    text = _json_one_line_per_item(doc, ("persons", "images"))
    (root / "ground_truth.json").write_text(text, encoding="utf-8")


def _json_one_line_per_item(doc: dict[str, Any], blocks: tuple[str, ...]) -> str:
    """JSON with one line per entry of the ``blocks`` fields: readable, and every line is
    encoded by json's fast C encoder (``indent`` would switch to the slow pure-Python one)."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    parts = []
    for key, value in doc.items():
        if key in blocks and isinstance(value, dict):
            text = "{\n  " + ",\n  ".join(f"{dump(k)}: {dump(v)}" for k, v in value.items())
            text += "\n}"
        elif key in blocks:
            text = "[\n  " + ",\n  ".join(dump(v) for v in value) + "\n]"
        else:
            text = dump(value)
        parts.append(f"{dump(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock: concurrent callers (processes, Ray workers) wait here."""
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_synthetic_dataset(cache_root: Path, spec: SyntheticSpec, num_workers: int = 1) -> Path:
    """The data_dir of ``spec`` under ``cache_root/synthetic/<hash>``, rendering it once.

    Rendering goes to a temp dir that is renamed into place, so the folder is either absent or
    complete; a concurrent caller blocks on the lock, then reuses the finished folder.
    """
    base = Path(cache_root).expanduser() / "synthetic"
    base.mkdir(parents=True, exist_ok=True)
    final = base / spec.digest()
    if final.is_dir():
        print(f"reusing synthetic dataset at {final}", flush=True)
        return final / DATA_DIR
    with _file_lock(base / f"{spec.digest()}.lock"):
        if final.is_dir():
            print(f"reusing synthetic dataset at {final}", flush=True)
            return final / DATA_DIR
        for stale in base.glob(f".{final.name}-*"):  # left by a killed renderer; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        desc = (
            f"{spec.num_identities} identities x {spec.frames_per_identity} frames, "
            f"seed {spec.seed}, {spec.image_px} px"
        )
        print(f"generating synthetic dataset ({desc}) at {final} ...", flush=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=base))
        try:
            render_dataset(tmp, spec, num_workers)
            # A whole folder, published once under the lock (files.atomic_write replaces files).
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        n = spec.num_identities * (1 + spec.frames_per_identity)
        print(
            f"synthetic dataset ready: {n} images in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return final / DATA_DIR
