"""The ControlNet-style pose control branch (``ImageControlNet.control``).

It sees the encoder's maps and the source/target poses and injects FiLM scale/shift plus an
additive feature map into the first ``num_control_layers`` decoder scales through
zero-initialised projections, so an untrained branch leaves the generator's output exactly
unchanged while gradients still reach it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from controlnet_ray.model.controlnet.pose_head import POSE_SCALE_DEG
from controlnet_ray.model.controlnet.unet import (
    NUM_SCALES,
    Injection,
    decoder_view,
    decoder_view_channels,
)
from controlnet_ray.model.encoders import EncoderFeatures, conv_act

POSE_FEATURES = 21  # sin/cos of source, target and difference (18) + difference / 90 deg (3)


def encode_poses(source_pose: torch.Tensor, target_pose: torch.Tensor) -> torch.Tensor:
    """Degrees -> [B, 21]: sin/cos of source, target and target-source, plus the raw difference."""
    src, tgt = torch.deg2rad(source_pose), torch.deg2rad(target_pose)
    diff = tgt - src
    parts = [
        torch.sin(src),
        torch.cos(src),
        torch.sin(tgt),
        torch.cos(tgt),
        torch.sin(diff),
        torch.cos(diff),
        diff / math.radians(POSE_SCALE_DEG),
    ]
    return torch.cat(parts, dim=1)


def _zero(module: nn.Conv2d | nn.Linear) -> nn.Module:
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class ControlBranch(nn.Module):
    """Pose-conditioned branch producing injections for the coarsest ``num_layers`` scales.

    Only the final projections (``zero_maps``, ``zero_films``) start at zero, as in ControlNet,
    so gradients reach them from step one and the rest of the branch learns afterwards.
    """

    def __init__(
        self,
        map_channels: tuple[int, ...],
        dec_channels: tuple[int, ...],
        num_layers: int,
        hidden: int,
    ) -> None:
        super().__init__()
        if not 1 <= num_layers <= NUM_SCALES:
            raise ValueError(f"ModelConfig.num_control_layers must be in 1..5, got {num_layers}")
        skips = decoder_view_channels(map_channels)[:num_layers]
        widths = [max(d // 2, 16) for d in dec_channels[:num_layers]]
        self.pose_mlp = nn.Sequential(
            nn.Linear(POSE_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.map_in = nn.ModuleList(nn.Conv2d(s, w, 1) for s, w in zip(skips, widths, strict=True))
        self.pose_in = nn.ModuleList(nn.Linear(hidden, w) for w in widths)
        self.body = nn.ModuleList(conv_act(w, w) for w in widths)
        self.zero_maps = nn.ModuleList(
            _zero(nn.Conv2d(w, d, 1))
            for w, d in zip(widths, dec_channels[:num_layers], strict=True)
        )
        self.zero_films = nn.ModuleList(
            _zero(nn.Linear(hidden, 2 * d)) for d in dec_channels[:num_layers]
        )

    def forward(
        self, feats: EncoderFeatures, source_pose: torch.Tensor, target_pose: torch.Tensor
    ) -> list[Injection]:
        pose = self.pose_mlp(encode_poses(source_pose, target_pose))
        maps = decoder_view(feats.maps)
        out = []
        for i, body in enumerate(self.body):
            x = self.map_in[i](maps[i]) + self.pose_in[i](pose)[:, :, None, None]
            x = body(F.leaky_relu(x, 0.2))
            scale, shift = self.zero_films[i](pose).chunk(2, dim=1)
            out.append(Injection(scale, shift, self.zero_maps[i](x)))
        return out
