"""Texture and shading: the face painted as a texture on the head-frame surface (eyes, brows,
mouth, beard, marks, glasses), hair cut by the hairline, wrapped-Lambert lighting.

Points and colours are planar [3,N] arrays, all masks element-wise."""

from __future__ import annotations

from typing import Any

import numpy as np

from controlnet_ray.data.synthetic.shapes import (
    CLOTH,
    HAIR,
    LIPS,
    NECK,
    NOSE,
    SKIN,
    Detail,
    Identity,
)
from controlnet_ray.data.synthetic.spec import Lighting


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
