"""Rendering one image of an identity at a known pose: cast, shade, composite over the
background, box-filter the supersampled buffer; landmarks are exact projections."""

from __future__ import annotations

import cv2
import numpy as np

from controlnet_ray.data.geometry import head_to_camera, project, rotation_from_ypr
from controlnet_ray.data.synthetic.background import render_background
from controlnet_ray.data.synthetic.raycast import _cast_grid, _make_grid, _normals
from controlnet_ray.data.synthetic.shading import _albedo, _hair_mask, _shade
from controlnet_ray.data.synthetic.shapes import Ellipsoid, Identity
from controlnet_ray.data.synthetic.spec import SUPERSAMPLE, Background, Lighting, Placement

LANDMARK_NOISE_PX = 0.5


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
