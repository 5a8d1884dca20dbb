"""Patch discriminator for the adversarial option (``--adversarial_loss_weight``).

A small PatchGAN (pix2pix's C64-C128-C256-C512 design, narrowed): each output logit judges one
~70 px receptive field of the image, so the critic looks at local texture and sharpness, which
is what a pixel loss alone leaves blurry, not at global layout (the pixel and pose losses own
that).  Spectral norm on every convolution and no normalisation layers: the hinge loss needs a
Lipschitz-bounded critic to give the generator useful gradients, and BatchNorm would couple the
real and generated halves of a batch.

It is conditioned on the requested pose by three constant planes (yaw, pitch, roll in
``POSE_SCALE_DEG`` units) concatenated to the image, so "a sharp face at the wrong angle" is
judged fake too.  It is a separate module, never a sub-module of :class:`ImageControlNet`:
inference and export load the generator alone, and the training worker checkpoints the
discriminator under its own keys.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from controlnet_ray.config import ModelConfig
from controlnet_ray.model.controlnet import POSE_SCALE_DEG

LEAK = 0.2  # LeakyReLU slope of the pix2pix/DCGAN discriminators
POSE_PLANES = 3


def _conv(c_in: int, c_out: int, stride: int) -> nn.Module:
    """4x4 convolution with spectral norm (the one kind of layer the critic uses)."""
    return spectral_norm(nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=1))


class PatchDiscriminator(nn.Module):
    """``(image [B,3,H,W] in [-1,1], pose [B,3] degrees) -> logits [B,1,h,w]``, one per patch.

    Three stride-2 and two stride-1 4x4 convolutions: a 112 px input gives a 12x12 map whose
    logits each see a 70x70 px field.
    """

    def __init__(self, base_channels: int = 32) -> None:
        super().__init__()
        c = base_channels
        widths = (3 + POSE_PLANES, c, 2 * c, 4 * c, 4 * c)
        strides = (2, 2, 2, 1)
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip(widths[:-1], widths[1:], strides, strict=True):
            layers += [_conv(c_in, c_out, stride), nn.LeakyReLU(LEAK, inplace=True)]
        layers.append(_conv(widths[-1], 1, stride=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        b, _, h, w = image.shape
        planes = (pose / POSE_SCALE_DEG).to(image.dtype).view(b, POSE_PLANES, 1, 1)
        return self.net(torch.cat([image, planes.expand(b, POSE_PLANES, h, w)], dim=1))


def build_discriminator(cfg: ModelConfig) -> PatchDiscriminator:
    """The discriminator for a model built from ``cfg`` (as wide as its generator's first level)."""
    return PatchDiscriminator(cfg.base_channels)


__all__ = ["PatchDiscriminator", "build_discriminator"]
