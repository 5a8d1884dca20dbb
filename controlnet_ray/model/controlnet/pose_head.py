"""The pose head (``ImageControlNet.pose_head``): (yaw, pitch, roll) / ``POSE_SCALE_DEG``
regressed from an image."""

from __future__ import annotations

import torch
from torch import nn

from controlnet_ray.model.encoders import conv_act

POSE_SCALE_DEG = 90.0


class PoseHead(nn.Module):
    """Small CNN: image in [-1, 1] -> (yaw, pitch, roll) / POSE_SCALE_DEG. No BatchNorm, so
    running it on generated images cannot disturb any statistics."""

    def __init__(self, base_channels: int) -> None:
        super().__init__()
        c = base_channels
        self.features = nn.Sequential(
            conv_act(3, max(c // 2, 8), 2),
            conv_act(max(c // 2, 8), c, 2),
            conv_act(c, 2 * c, 2),
            conv_act(2 * c, 4 * c, 2),
            conv_act(4 * c, 4 * c),
        )
        self.head = nn.Sequential(nn.Linear(4 * c, 4 * c), nn.SiLU(), nn.Linear(4 * c, 3))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).mean(dim=(2, 3)))
