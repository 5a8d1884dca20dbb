"""arcface_torch's residual block (:class:`IBasicBlock`) and the conv/BatchNorm layers it and
the stem are made of; ``fused`` builds them in the BN-folded form of ONNX weights."""

from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int, kernel: int, stride: int, fused: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=fused)


def _bn_or_identity(channels: int, fused: bool) -> nn.Module:
    """A BatchNorm that follows a conv; in fused form it was folded into that conv."""
    return nn.Identity() if fused else nn.BatchNorm2d(channels, eps=1e-5)


class IBasicBlock(nn.Module):
    """arcface_torch's pre-activation basic block: BN -> conv -> BN -> PReLU -> conv -> BN."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, fused: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)  # precedes a conv: never folded
        self.conv1 = _conv(inplanes, planes, 3, 1, fused)
        self.bn2 = _bn_or_identity(planes, fused)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv(planes, planes, 3, stride, fused)
        self.bn3 = _bn_or_identity(planes, fused)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                _conv(inplanes, planes, 1, stride, fused), _bn_or_identity(planes, fused)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity
