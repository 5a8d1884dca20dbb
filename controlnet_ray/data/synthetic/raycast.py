"""Ray casting against unions of ellipsoids: per-pixel z-buffered hits, surface normals with
smoothed creases, and the straight-ahead surface probes that place landmarks and marks.

Rays are taken into the head (or body) frame, where every ellipsoid intersection is a
closed-form quadratic; all point arrays are planar [3,N]."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from controlnet_ray.data.geometry import FLIP
from controlnet_ray.data.synthetic.shapes import HAIR, Ellipsoid
from controlnet_ray.data.synthetic.spec import SUPERSAMPLE

CREASE_MM = 6.0  # how far from a crease the skin normals are blended


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
