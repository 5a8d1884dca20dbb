"""Drawing one synthetic person from a random stream: head shape (skull, jaw, nose, lips, ears,
hair), body, colours, hairline and one or two identity-specific surface marks."""

from __future__ import annotations

import math

import numpy as np

from controlnet_ray.data.synthetic.raycast import _front_z, _landmarks, _surface
from controlnet_ray.data.synthetic.shapes import (
    CLOTH,
    EAR,
    HAIR,
    LIPS,
    NECK,
    NOSE,
    SKIN,
    Detail,
    Ellipsoid,
    Identity,
)

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
