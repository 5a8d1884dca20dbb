"""The warp-and-refine head of ``generator="warp"`` (the default).

The encoder's maps are warped by the analytic motion of a 3D head proxy from the source to the
target pose (:mod:`controlnet_ray.model.warp`), so the U-Net's skips carry the *target's*
layout.  With ``--head_shape learned`` (the default) the proxy ellipsoid is each person's own:
:func:`learned_shape` reads its bounded centre and radii from the encoder's identity code.  The
decoder then predicts a residual flow (zero-initialised), a visibility mask and a
fill image, and :func:`compose` returns
``mask * warp(source, proxy + residual) * gain + (1 - mask) * hidden``.

``hidden``, what the source could not show, depends on ``--fill_seed``: a residual image on the
source head's mean colour (``head_colour``) or on the source at the same height of its seen side
(``latitude``); or (``copy``, the default) source pixels *copied* through a second learned
flow that starts at that seen-side grid, blended by a learned mask with the head-colour fill.
A flow cannot average colours, so the side of a head it fills keeps the hair's and skin's
texture instead of the blur an image loss makes of a predicted fill.
"""

from __future__ import annotations

import torch
from torch import nn

from controlnet_ray.model.warp import ProxyFlow, ProxyShape, fixed_shape, warp

WARP_CHANNELS = 7  # fill RGB, mask logit, residual flow (x, y), log gain of the warped source
COPY_CHANNELS = 3  # ``copy`` adds: the copy flow's offset (x, y) and the copy mask's logit
MASK_PRIOR = 3.0  # mask logit where the proxy says the source showed (+) / hid (-) the point
#: The residual flow's reach in crop half-sides (tanh-bounded): enough to fix local misfits of
#: the proxy (nose, ears, perspective), too little to pull a turned face back towards the
#: middle, which an image loss otherwise learns (the blur of the conditional mean: at 0.25 the
#: held-out judged yaw error grew from 13 to 18 deg between epochs 12 and 36).
FLOW_RESIDUAL_SCALE = 0.05
#: ``copy``: how far (crop half-sides, tanh-bounded) the copy flow may move from the seen-side
#: grid to find the pixels a hidden point copies; and the copy mask's starting logit (copy
#: 88 %, head-colour fill 12 % before training).  Chosen by training (benchmarks/README.md).
COPY_REACH = 0.5
COPY_PRIOR = 2.0
#: ``--head_shape learned``: a zero-initialised linear head on the encoder's identity code moves
#: the proxy ellipsoid's centre by up to ``SHAPE_CENTRE_REACH`` crop half-sides and scales its
#: radii by up to ``exp(+-SHAPE_RADII_REACH)`` (tanh-bounded), one shape per source image.
#: Chosen by training (benchmarks/README.md): the fixed proxy is a compromise over persons and
#: parts of the head; bounded, a learned one cannot shrink the head into a blur.
SHAPE_CHANNELS = 6  # centre offset (x, y, z), log radii scale (x, y, z)
SHAPE_CENTRE_REACH = 0.05
SHAPE_RADII_REACH = 0.15
#: the shape head's peak learning rate is at most this (its updates are scaled down when --lr
#: is higher): uncapped at lr 2e-3, the 400-identity benchmark's seed 1 turned faces 2.4x / 2.0x
#: the judge's floor (capped: 1.5x / 1.6x; seed 0 1.5x / 1.4x either way). The default --lr
#: (1e-4) is not capped. (That seed's pose varies with the run whatever the proxy: the fixed
#: proxy read 1.5x / 1.3x once and 2.3x / 1.7x at 2000 steps; benchmarks/README.)
SHAPE_HEAD_MAX_LR = 1e-4


def warp_channels(fill_seed: str) -> int:
    """The warp generator's raw output channels for ``fill_seed``."""
    return WARP_CHANNELS + (COPY_CHANNELS if fill_seed == "copy" else 0)


def needs_fill_grid(fill_seed: str) -> bool:
    """Whether ``fill_seed`` samples the source at ``ProxyFlow.fill_grid`` (the seen side)."""
    return fill_seed in ("copy", "latitude")


def learned_shape(raw: torch.Tensor, head_proxy: str = "skull") -> ProxyShape:
    """[B, SHAPE_CHANNELS] raw shape-head output -> each head's proxy ellipsoid (a
    ``skull_jaw`` proxy's jaw stays the fixed one); zeros give the fixed proxy exactly."""
    raw = raw.float()
    fixed = fixed_shape(raw.shape[0], raw.device, head_proxy)
    centre = fixed.centre + SHAPE_CENTRE_REACH * torch.tanh(raw[:, 0:3])
    radii = fixed.radii * torch.exp(SHAPE_RADII_REACH * torch.tanh(raw[:, 3:6]))
    return ProxyShape(centre, radii, fixed.jaw)


def _init_warp_head(conv: nn.Conv2d) -> None:
    """Zero the output channels of mask, residual flow and gain, and ``copy``'s offset and
    mask (PixelShuffle puts output channel k at conv channels 4k..4k+3): an untrained warp
    generator returns the proxy's warp of the source where the proxy saw it, exactly, and
    learns corrections from there.  The fill
    channels get the same kernel for all four sub-pixels (ICNR), so the fill starts smooth
    instead of with PixelShuffle's checkerboard."""
    with torch.no_grad():
        conv.weight[12:].zero_()
        conv.bias[12:].zero_()
        for k in range(3):
            conv.weight[4 * k : 4 * k + 4] = conv.weight[4 * k].clone()
            conv.bias[4 * k : 4 * k + 4] = conv.bias[4 * k].clone()


def compose(
    source: torch.Tensor, flow: ProxyFlow, raw: torch.Tensor, fill_seed: str = "copy"
) -> torch.Tensor:
    """The warp generator's image from its raw decoder output (:func:`warp_channels`).

    The fill is a residual on a seed, so what the source could not show starts from the
    person's own hair and skin rather than grey: ``head_colour``, the source head's mean
    colour, or ``latitude``, the source's head at the same height seen from its nearest
    well-seen side (``ProxyFlow.fill_grid``; ``--fill_seed``); ``copy`` blends that
    head-colour fill with source pixels copied from near the seen side (see the module
    docstring)."""
    seed = "head_colour" if fill_seed == "copy" else fill_seed
    fill = (fill_seed_image(source, flow, seed) + raw[:, 0:3]).clamp(-1.0, 1.0)
    prior = MASK_PRIOR * (2.0 * flow.visible - 1.0) * flow.head
    mask = torch.sigmoid(raw[:, 3:4] + prior.to(raw.dtype))
    residual = FLOW_RESIDUAL_SCALE * torch.tanh(raw[:, 4:6]).permute(0, 2, 3, 1)
    moved = warp(source, flow.grid + residual.to(flow.grid.dtype))
    gain = torch.exp(raw[:, 6:7].clamp(-2.0, 2.0))
    if fill_seed == "copy":
        fill = _copy_fill(source, flow, raw, gain, fill)
    return (mask * (moved * gain + gain - 1.0) + (1.0 - mask) * fill).clamp(-1.0, 1.0)


def _copy_fill(
    source: torch.Tensor, flow: ProxyFlow, raw: torch.Tensor, gain: torch.Tensor, fill: torch.Tensor
) -> torch.Tensor:
    """``copy``: source pixels at the seen-side grid plus a learned offset, lit by the same gain
    as the warped source, blended with the predicted ``fill`` by a learned mask."""
    if flow.fill_grid is None:
        raise ValueError("fill_seed 'copy' needs proxy_flow(..., with_fill=True)")
    offset = COPY_REACH * torch.tanh(raw[:, 7:9]).permute(0, 2, 3, 1)
    copied = warp(source, flow.fill_grid + offset.to(flow.fill_grid.dtype))
    take = torch.sigmoid(raw[:, 9:10] + COPY_PRIOR)
    return take * (copied * gain + gain - 1.0) + (1.0 - take) * fill


def fill_seed_image(source: torch.Tensor, flow: ProxyFlow, fill_seed: str) -> torch.Tensor:
    """What the fill starts from (see :func:`compose`)."""
    if fill_seed == "head_colour":
        return head_colour(source, flow)
    if fill_seed == "latitude":
        if flow.fill_grid is None:
            raise ValueError("fill_seed 'latitude' needs proxy_flow(..., with_fill=True)")
        return warp(source, flow.fill_grid)
    raise ValueError(f"fill_seed must be 'latitude' or 'head_colour', got {fill_seed!r}")


def head_colour(source: torch.Tensor, flow: ProxyFlow) -> torch.Tensor:
    """[B,3,1,1] mean colour of the source where the proxy saw the head (its own silhouette)."""
    mask = flow.source_head.to(source.dtype)
    return (source * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp(1.0)
