"""The U-Net decoder (``ImageControlNet.generator``) and the layout of its levels.

It is a U-Net style decoder (coarsest scale first) that reads the encoder's maps as skips, so
details of the source survive; it never sees poses itself, only the control branch's
injections (:class:`Injection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from controlnet_ray.model.encoders import EncoderFeatures, conv_act

NUM_SCALES = 5  # decoder levels at strides 16, 8, 4, 2, 1


@dataclass
class Injection:
    """One control injection: ``h * (1 + scale) + shift + residual`` at one decoder scale."""

    scale: torch.Tensor
    shift: torch.Tensor
    residual: torch.Tensor


def decoder_channels(base_channels: int) -> tuple[int, ...]:
    """Channels of the decoder's tensors, coarsest (stride 16) first.

    The last, full-resolution level is held space-to-depth: ``4 k`` channels at stride 2 stand
    for ``k = max(c / 4, 8)`` channels at stride 1.  Convolutions over a handful of channels at
    full resolution run several times slower per FLOP on CPUs than the same work folded into
    channels, and a 3x3 conv in this form covers a 6x6 full-resolution window.
    """
    c = base_channels
    return (4 * c, 4 * c, 2 * c, c, 4 * max(c // 4, 8))


def decoder_view(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Encoder maps (finest first) as the decoder consumes them: coarsest first, the
    full-resolution one space-to-depth (see ``decoder_channels``)."""
    coarse_first = maps[::-1]
    return [*coarse_first[:-1], F.pixel_unshuffle(coarse_first[-1], 2)]


def decoder_view_channels(map_channels: tuple[int, ...]) -> tuple[int, ...]:
    coarse_first = tuple(reversed(map_channels))
    return (*coarse_first[:-1], 4 * coarse_first[-1])


class Generator(nn.Module):
    """U-Net decoder: stride-16 bottleneck (+ identity code) up to full resolution, tanh out.

    Each level adds a 1x1 projection of the encoder map of its scale (the skip) to the
    upsampled coarser level, then applies a 3x3 conv; upsampling is sub-pixel (1x1 conv at the
    coarse scale + PixelShuffle).  It never sees poses: those arrive only as control injections.
    """

    def __init__(
        self,
        map_channels: tuple[int, ...],
        channels: tuple[int, ...],
        feature_dim: int,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        self.channels = channels
        skips = decoder_view_channels(map_channels)
        self.skip = nn.ModuleList(nn.Conv2d(s, c, 1) for s, c in zip(skips, channels, strict=True))
        self.code = nn.Linear(feature_dim, channels[0])
        ups: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(channels[i - 1], 4 * channels[i], 1), nn.PixelShuffle(2))
            for i in range(1, NUM_SCALES - 1)
        ]
        ups.append(nn.Conv2d(channels[-2], channels[-1], 1))  # already stride-2 space-to-depth
        self.up = nn.ModuleList(ups)
        self.blocks = nn.ModuleList(conv_act(c, c) for c in channels)
        self.to_rgb = nn.Sequential(
            nn.Conv2d(channels[-1], 4 * out_channels, 3, padding=1), nn.PixelShuffle(2)
        )

    def forward(
        self, feats: EncoderFeatures, injections: list[Injection] | None = None
    ) -> torch.Tensor:
        """Raw decoder output at full resolution (``out_channels``; no activation)."""
        maps = decoder_view(feats.maps)
        h = self.skip[0](maps[0]) + self.code(feats.code)[:, :, None, None]
        for level in range(NUM_SCALES):
            if level:
                h = self.up[level - 1](h) + self.skip[level](maps[level])
            h = self.blocks[level](F.leaky_relu(h, 0.2))
            if injections is not None and level < len(injections):
                inj = injections[level]
                h = h * (1 + inj.scale[:, :, None, None]) + inj.shift[:, :, None, None]
                h = h + inj.residual
        return self.to_rgb(h)
