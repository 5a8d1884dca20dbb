"""Analytic head motion between two poses: the 3D proxy that seeds the warp generator.

Crops are framed on the head (``data.align`` with ``--framing head``): the head centre sits at
the crop centre and the crop's half-side is a fixed size at the head centre's depth, at every
pose.  In those crop units (grid_sample's normalised coordinates, x right, y down, ``[-1, 1]``
edge to edge) the head is approximately an ellipsoid rotating about the crop centre (with
``head_proxy skull_jaw`` joined by a second one, the jaw), so the motion of every visible head
point from the source pose to the target pose is known without learning anything:

* a target pixel's ray (orthographic, along the view axis) is intersected with the proxy
  rotated to the target pose (the nearer hit of the two ellipsoids); no hit is background,
  which is left in place;
* the hit point, rotated to the source pose and projected, is where to sample the source;
* it was visible in the source when the ellipsoid's normal there faced the camera;
* where it was not, the fill copies from (``--fill_seed copy``, the default) or starts from
  (``latitude``) the same height of the head turned round to its nearest well-seen side
  (``fill_grid``): the side of a head the ID photo never showed is mostly more of what it
  showed at that height -- hair at hair height, skin at cheek height; the further round a
  point is, the nearer the silhouette it is looked for (``--seen_side spread``).

The generator learns only the residual flow, what the proxy cannot know (perspective, the nose,
ears, hair), and fills what the source could not show.  Angles follow
``data.geometry``: ``R = Rz(roll) Rx(-pitch) Ry(yaw)``, head frame x right, y up, z to the
viewer.  This module imports only torch (and the config's choice lists): the model package
never imports the data package, so the proxy is stated in crop units here and a test ties it
to ``data.align``'s framing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from controlnet_ray.config.choices import HEAD_PROXIES, SEEN_SIDES

#: Proxy ellipsoid in crop units (1 = the crop's half-side, ``data.align.HEAD_HALF_SIZE_MM``
#: = 140 mm), head frame, relative to the head centre the crop is framed on
#: (``data.align.HEAD_CENTER_MM``): the skull with its hair seen from the front, and deeper
#: than the skull (140 mm, not 98), because the face is nearer the camera than the head centre
#: and so moves further in the image than an orthographic skull would.  Chosen with
#: ``benchmarks/proxy_fit.py`` on training pairs (judged median yaw error of the bare proxy
#: warp: 19.3 deg for the skull's own depth, 8.4 for this one) and confirmed by training
#: (held-out judged yaw 13.4 -> 6.5 deg after 12 epochs; benchmarks/README.md).
PROXY_CENTER = (0.0, 0.09, 0.0)
PROXY_RADII = (0.58, 0.78, 1.0)
#: ``head_proxy skull_jaw`` (the default): a second ellipsoid, the jaw, joined to the first so
#: that the chin and the mouth turn with the head.  The head ellipsoid ends at the mouth (and
#: a learned shape shrinks it further, to its bounds), so below it the source was left in
#: place and a turned or tilted face showed two mouths.  The embedded renderer's mean jaw
#: (centre 47 mm below and 20 mm in front of the head centre, radii 63 x 62 x 63 mm) in crop
#: units, its depth scaled like the head's (x1.43); it is the same for every head.
JAW_CENTER = (0.0, -0.34, 0.20)
JAW_RADII = (0.45, 0.44, 0.64)
#: Visibility in the source ramps from 0 to 1 as the cosine between the proxy's normal and the
#: view axis goes from 0.15 to 0.45 (about 81 to 63 degrees off the view axis).
VISIBLE_COS = (0.15, 0.45)
#: The fill seed of a head point the source did not show: the same point turned about the
#: head's vertical axis to at most this many degrees of longitude from the source's view
#: direction, where the source shows the head well inside its silhouette (further out, the
#: background beside a head narrower than the proxy leaks in; nearer the middle, the turned
#: side looks like a second face and reads as less turned).  Chosen by training
#: (``benchmarks/recipe.py``, 40/55/65 deg; benchmarks/README.md, "Faces that turn").
FILL_LONGITUDE_DEG = 55.0
#: ``seen_side="spread"`` (the model's default, ``--seen_side``): a hidden point further than
#: ``FILL_LONGITUDE_DEG`` round the head is not put at that limit but spread, in order, over
#: the grazing band beyond it -- ``limit + SPREAD_RATE * (longitude - limit)``, at most
#: ``SPREAD_LIMIT_DEG`` -- so an ear or the hair at 90 deg is looked for near the silhouette,
#: where a frontal photo shows the side of the head edge-on, and not on the cheek at 55 deg.
#: ``"clamp"`` puts every hidden point at the limit (checkpoints before ``spread``).  Chosen by
#: training (benchmarks/README.md, "Faces that turn").
SPREAD_RATE = 0.3
SPREAD_LIMIT_DEG = 80.0


@dataclass
class ProxyFlow:
    """The proxy's answer for a batch of target images (all ``[B, ...]``)."""

    grid: torch.Tensor  # [B,H,W,2] where to sample the source, grid_sample coordinates
    head: torch.Tensor  # [B,1,H,W] 1 where the target pixel shows the head (the proxy's hit)
    visible: torch.Tensor  # [B,1,H,W] 1 where that head point was visible in the source
    source_head: torch.Tensor  # [B,1,H,W] the head's silhouette in the source image
    # [B,H,W,2] where the source shows the head at that height; only when asked for
    # (``with_fill``): the ``copy`` and ``latitude`` fills use it
    fill_grid: torch.Tensor | None = None


@dataclass
class ProxyShape:
    """Each head's proxy in crop units, head frame: the head ellipsoid's ``centre`` and
    ``radii`` [B,3], and with ``head_proxy skull_jaw`` the jaw's (``jaw``: centre, radii)."""

    centre: torch.Tensor
    radii: torch.Tensor
    jaw: tuple[torch.Tensor, torch.Tensor] | None = None

    def broadcast(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre, radii) as [B,1,1,3], against [B,H,W,3] points."""
        return self.centre[:, None, None, :], self.radii[:, None, None, :]

    def float(self) -> ProxyShape:
        jaw = (self.jaw[0].float(), self.jaw[1].float()) if self.jaw is not None else None
        return ProxyShape(self.centre.float(), self.radii.float(), jaw)


def fixed_shape(batch: int, device: torch.device, head_proxy: str = "skull") -> ProxyShape:
    """The fixed proxy (``PROXY_CENTER``, ``PROXY_RADII``; with ``head_proxy="skull_jaw"`` the
    jaw ``JAW_CENTER``, ``JAW_RADII`` too) for every head of a batch."""
    if head_proxy not in HEAD_PROXIES:
        raise ValueError(f"head_proxy must be one of {HEAD_PROXIES}, got {head_proxy!r}")

    def rows(values: tuple[float, float, float]) -> torch.Tensor:
        return torch.tensor(values, device=device).expand(batch, 3)

    jaw = (rows(JAW_CENTER), rows(JAW_RADII)) if head_proxy == "skull_jaw" else None
    return ProxyShape(rows(PROXY_CENTER), rows(PROXY_RADII), jaw)


def rotation_from_ypr(pose_deg: torch.Tensor) -> torch.Tensor:
    """[B,3] degrees -> [B,3,3] head rotations, ``Rz(roll) @ Rx(-pitch) @ Ry(yaw)``."""
    yaw, pitch, roll = torch.deg2rad(pose_deg.float()).unbind(dim=1)
    one, zero = torch.ones_like(yaw), torch.zeros_like(yaw)

    def mat(rows: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)

    cy, sy, cp, sp, cr, sr = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin(), roll.cos(), roll.sin()
    ry = mat([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    rx = mat([[one, zero, zero], [zero, cp, sp], [zero, -sp, cp]])  # Rx(-pitch)
    rz = mat([[cr, -sr, zero], [sr, cr, zero], [zero, zero, one]])
    return rz @ rx @ ry


def pixel_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """[H,W,2] pixel centres in grid_sample coordinates (align_corners=False)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=device, dtype=torch.float32) * 2 + 1) / width - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def _cast(
    rot: torch.Tensor, pix: torch.Tensor, shape: ProxyShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hit [B,H,W] bool, head-frame hit point, and the centre and radii of the ellipsoid it
    hit, each [B,H,W,3]) of each pixel's ray (orthographic, along the view axis, nearest the
    viewer) on the proxy seen at rotation ``rot``: the head ellipsoid, joined by the jaw's
    where ``shape`` has one."""
    centre, radii = shape.broadcast()
    hit, s, p0, d = _cast_one(rot, pix, centre, radii)
    if shape.jaw is not None:
        jaw_c, jaw_r = ProxyShape(*shape.jaw).broadcast()
        jaw_hit, jaw_s, _, _ = _cast_one(rot, pix, jaw_c, jaw_r)
        on_jaw = jaw_hit & (~hit | (jaw_s > s))
        s, hit = torch.where(on_jaw, jaw_s, s), hit | jaw_hit
        centre = torch.where(on_jaw[..., None], jaw_c, centre)
        radii = torch.where(on_jaw[..., None], jaw_r, radii)
    return hit, p0 + s[..., None] * d, centre.expand_as(p0), radii.expand_as(p0)


def _cast_one(
    rot: torch.Tensor, pix: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hit [B,H,W], ray parameter s, ray origins p0, view axis d) on one ellipsoid."""
    # camera frame (x right, y up, z to the viewer) of the pixel at depth 0
    cam = torch.stack([pix[..., 0], -pix[..., 1], torch.zeros_like(pix[..., 0])], dim=-1)
    inv = rot.transpose(1, 2)  # head <- camera
    p0 = torch.einsum("bij,hwj->bhwi", inv, cam)  # [B,H,W,3] head frame
    d = inv[:, :, 2][:, None, None, :]  # view axis in the head frame, [B,1,1,3]
    u, v = (p0 - centre) / radii, d / radii
    a = (v * v).sum(-1)
    b = 2 * (u * v).sum(-1)
    c = (u * u).sum(-1) - 1
    disc = b * b - 4 * a * c
    s = (-b + disc.clamp(min=0).sqrt()) / (2 * a)  # the intersection nearer the viewer
    return disc > 0, s, p0, d


def proxy_flow(
    source_pose: torch.Tensor,
    target_pose: torch.Tensor,
    height: int,
    width: int,
    with_fill: bool = False,
    shape: ProxyShape | None = None,
    seen_side: str = "spread",
) -> ProxyFlow:
    """Where each target pixel's head point was in the source (see the module docstring);
    ``with_fill``: also ``fill_grid``, for ``--fill_seed copy`` and ``latitude``, with hidden
    points spread over or clamped to the seen side (``seen_side``, :data:`SPREAD_RATE`);
    ``shape``: each head's own ellipsoid (default: the fixed proxy, :func:`fixed_shape`).

    Always float32, autocast or not: under bfloat16 autocast the rotations and ray casts ran
    in bfloat16 (8 mantissa bits: sampling grids off by up to a fifth of a pixel at 112 px,
    the discriminant of grazing rays rounded to either side of 0)."""
    if seen_side not in SEEN_SIDES:
        raise ValueError(f"seen_side must be one of {SEEN_SIDES}, got {seen_side!r}")
    with torch.autocast(source_pose.device.type, enabled=False):
        shape = shape.float() if shape is not None else None
        pose_s, pose_t = source_pose.float(), target_pose.float()
        return _proxy_flow(pose_s, pose_t, height, width, with_fill, shape, seen_side)


def _proxy_flow(
    source_pose: torch.Tensor,
    target_pose: torch.Tensor,
    height: int,
    width: int,
    with_fill: bool,
    shape: ProxyShape | None,
    seen_side: str,
) -> ProxyFlow:
    pix = pixel_grid(height, width, source_pose.device)  # [H,W,2]
    if shape is None:
        shape = fixed_shape(source_pose.shape[0], pix.device)
    rot_t, rot_s = rotation_from_ypr(target_pose), rotation_from_ypr(source_pose)
    hit, p_hit, centre, radii = _cast(rot_t, pix, shape)
    src = _project(rot_s, p_hit)  # where the source shows it
    normal = (p_hit - centre) / (radii * radii)
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    cos_view = torch.einsum("bj,bhwj->bhw", rot_s[:, 2], normal)
    # soft: a point seen at a grazing angle in the source is smeared there (or background)
    facing = ((cos_view - VISIBLE_COS[0]) / (VISIBLE_COS[1] - VISIBLE_COS[0])).clamp(0.0, 1.0)
    grid = torch.where(hit[..., None], src, pix.expand_as(src))
    source_head = _cast(rot_s, pix, shape)[0].float()[:, None]
    fill_grid = None
    if with_fill:
        turned = _turn_to_seen_side(p_hit, rot_s, centre, radii, seen_side == "spread")
        seen = _project(rot_s, turned)
        fill_grid = torch.where(hit[..., None], seen, pix.expand_as(seen))
    visible = (hit.float() * facing)[:, None]
    return ProxyFlow(grid, hit.float()[:, None], visible, source_head, fill_grid)


def _project(rot: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Head-frame points [B,H,W,3] seen at rotation ``rot`` -> grid_sample coordinates."""
    q = torch.einsum("bij,bhwj->bhwi", rot, p)
    return torch.stack([q[..., 0], -q[..., 1]], dim=-1)


def _turn_to_seen_side(
    p: torch.Tensor, rot_s: torch.Tensor, centre: torch.Tensor, radii: torch.Tensor, spread: bool
) -> torch.Tensor:
    """Proxy points [B,H,W,3] turned about the head's vertical axis, each at its own height,
    to at most ``FILL_LONGITUDE_DEG`` from the source's view direction, or with ``spread``
    beyond it into the grazing band (:data:`SPREAD_RATE`); points already within it stay where
    they are."""
    u = (p - centre) / radii  # on the unit sphere
    view = rot_s[:, 2]  # the source camera's view axis in the head frame, [B,3]
    view_lon = torch.atan2(view[:, 0], view[:, 2])[:, None, None]
    off = torch.remainder(torch.atan2(u[..., 0], u[..., 2]) - view_lon + math.pi, 2 * math.pi)
    off = off - math.pi  # longitude from the view direction, in [-pi, pi)
    limit = math.radians(FILL_LONGITUDE_DEG)
    if spread:
        beyond = limit + SPREAD_RATE * (off.abs() - limit)
        off = off.sign() * torch.where(off.abs() > limit, beyond, off.abs())
        limit = math.radians(SPREAD_LIMIT_DEG)
    lon = view_lon + off.clamp(-limit, limit)
    ring = (1 - u[..., 1] ** 2).clamp(min=0).sqrt()
    turned = torch.stack([ring * lon.sin(), u[..., 1], ring * lon.cos()], dim=-1)
    return centre + radii * turned


def head_region(target_pose: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B,1,H,W] the proxy's silhouette at the target pose: the head pixels a loss should weigh."""
    pix = pixel_grid(height, width, target_pose.device)
    shape = fixed_shape(target_pose.shape[0], pix.device)
    return _cast(rotation_from_ypr(target_pose), pix, shape)[0].float()[:, None]


#: The ArcFace crop in the same units: its centre (4 mm below the eyes, 80 mm in front of the
#: head centre) and half-side (the 112-px template puts 63 mm between the eyes at 35.2 px, a
#: 100 mm half-side, seen ~10 % larger than at the head centre's depth because the face is
#: nearer the camera at usual distances).  Identity encoders see this part of a head crop.
FACE_CENTER = (0.0, 0.05, 0.57)
FACE_HALF_SIDE = 110.0 / 140.0


def face_grid(pose: torch.Tensor, size: int) -> torch.Tensor:
    """[B,size,size,2] sampling grid of the face square at ``pose`` (yaw and pitch move it;
    roll is left in, as a few degrees of tilt do not matter to an identity embedding)."""
    centre = rotation_from_ypr(pose) @ torch.tensor(FACE_CENTER, device=pose.device)
    shift = torch.stack([centre[:, 0], -centre[:, 1]], dim=-1)[:, None, None, :]
    return shift + FACE_HALF_SIDE * pixel_grid(size, size, pose.device)


def warp(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample ``image`` [B,C,h,w] at ``grid`` [B,H,W,2] resized to the image's resolution."""
    if grid.shape[1:3] != image.shape[-2:]:
        grid = resize_grid(grid, image.shape[-2], image.shape[-1])
    return torch.nn.functional.grid_sample(
        image, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )


def resize_grid(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A sampling grid at another resolution (values are resolution-free coordinates)."""
    g = grid.permute(0, 3, 1, 2)
    factor = max(1, math.ceil(grid.shape[1] / height))
    if factor > 1:
        g = torch.nn.functional.avg_pool2d(g, factor, ceil_mode=True)
    if g.shape[-2:] != (height, width):
        g = torch.nn.functional.interpolate(
            g, size=(height, width), mode="bilinear", align_corners=False
        )
    return g.permute(0, 2, 3, 1)
