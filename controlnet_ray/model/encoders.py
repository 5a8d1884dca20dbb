"""Image encoders: ArcFace iresnet, torchvision ResNet-50 and a small CPU-friendly CNN.

Every encoder takes a source image in [-1, 1] and returns feature maps at strides 1, 2, 4, 8 and
16 of the input size (so the U-Net decoder can use skips at every scale whatever the backbone's
own strides are) plus a global identity code of width ``ModelConfig.feature_dim``.  Pretrained
weights are loaded from local files only and after every initialiser has run, so nothing ever
overwrites them.  With ``freeze_backbone`` the backbone also stays in eval mode, so its BatchNorm
statistics cannot drift even while the rest of the model trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from controlnet_ray.config import ModelConfig
from controlnet_ray.model.iresnet import (
    IResNet,
    WeightsError,
    iresnet,
    load_iresnet,
    looks_like_torchvision_resnet,
    read_state_dict,
)

MAP_STRIDES = (1, 2, 4, 8, 16)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderFeatures(NamedTuple):
    """Feature maps ordered by ``MAP_STRIDES`` (finest first) and the global code [B, D]."""

    maps: list[torch.Tensor]
    code: torch.Tensor


def fit_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a feature map to ``size``: average-pool when shrinking, bilinear when growing."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ImageEncoder(nn.Module):
    """Shared wrapper: backbone maps -> stride-aligned maps, pooled features -> identity code."""

    def __init__(
        self, backbone: nn.Module, map_channels: tuple[int, ...], pooled_dim: int, feature_dim: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.map_channels = map_channels
        self.code_proj = nn.Linear(pooled_dim, feature_dim)
        self.backbone_frozen = False

    def backbone_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Five maps for strides 1..16 (any spatial size) and a pooled vector."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        maps, pooled = self.backbone_features(x)
        h, w = x.shape[-2:]
        maps = [fit_to(m, (h // s, w // s)) for m, s in zip(maps, MAP_STRIDES, strict=True)]
        return EncoderFeatures(maps, self.code_proj(pooled))

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze (or unfreeze) the backbone's parameters and BatchNorm statistics."""
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        """Like nn.Module.train, but a frozen backbone stays in eval (BN stats fixed)."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


LEAKY_SLOPE = 0.2


def _act() -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)


def conv_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + LeakyReLU, the building block of the small CNNs.

    He-initialised for the LeakyReLU so activations keep their scale through the
    normalisation-free stacks (PyTorch's default shrinks them about 3x per layer)."""
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
    nn.init.kaiming_normal_(conv.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, _act())


class SmallCNN(nn.Module):
    """Four-stage conv encoder sized for CPU training (widths c, 2c, 4c, 4c at strides 2..16).

    Its stride-1 "map" is the image itself: full-resolution convolutions dominate the cost on a
    CPU, and a stride-2 conv over the raw pixels already keeps every 2x2 patch recoverable.
    """

    def __init__(self, base_channels: int) -> None:
        super().__init__()
        c = base_channels
        self.widths = (3, c, 2 * c, 4 * c, 4 * c)
        w = self.widths
        self.stages = nn.ModuleList(
            [
                conv_act(3, w[1], 2),
                nn.Sequential(conv_act(w[1], w[2], 2), conv_act(w[2], w[2])),
                nn.Sequential(conv_act(w[2], w[3], 2), conv_act(w[3], w[3])),
                nn.Sequential(conv_act(w[3], w[4], 2), conv_act(w[4], w[4])),
            ]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = [x]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        return maps


class CNNEncoder(ImageEncoder):
    """The default encoder when no pretrained weights are given."""

    def __init__(self, cfg: ModelConfig) -> None:
        backbone = SmallCNN(cfg.base_channels)
        super().__init__(backbone, backbone.widths, backbone.widths[-1], cfg.feature_dim)
        if cfg.encoder_weights:
            _load_strict(backbone, read_state_dict(cfg.encoder_weights), cfg.encoder_weights)

    def backbone_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        maps = self.backbone(x)
        return maps, maps[-1].mean(dim=(2, 3))


class IResNetEncoder(ImageEncoder):
    """ArcFace iresnet; images are resized to its input size (112) and used as-is in [-1, 1].

    ArcFace normalises 0..255 RGB with (x - 127.5) / 127.5, which is exactly our [-1, 1] range.
    The identity code is a projection of the 512-d ArcFace embedding.
    """

    def __init__(self, cfg: ModelConfig, net: IResNet | None = None) -> None:
        if net is None:
            net = (
                load_iresnet(cfg.encoder_weights, cfg.iresnet_depth)
                if cfg.encoder_weights
                else iresnet(cfg.iresnet_depth)
            )
        super().__init__(net, (64, 64, 128, 256, 512), net.fc.out_features, cfg.feature_dim)

    def backbone_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        size = self.backbone.input_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(
                x,
                size=(size, size),
                mode="bilinear",
                align_corners=False,
                antialias=x.shape[-1] > size,
            )
        return self.backbone.forward_features(x)


class ResNet50Encoder(ImageEncoder):
    """torchvision ResNet-50 (ImageNet weights from a local file), normalised inside.

    Its stride-1 "map" is the image itself; layer3 and the upsampled layer4 form the stride-16
    map so neither is wasted.  The ImageNet classifier is dropped (unused parameters would also
    break DDP).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        net.fc = nn.Identity()
        super().__init__(net, (3, 64, 256, 512, 1024 + 2048), 2048, cfg.feature_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        if cfg.encoder_weights:
            sd = read_state_dict(cfg.encoder_weights)
            if not looks_like_torchvision_resnet(set(sd)):
                raise WeightsError(
                    f"--encoder_weights {cfg.encoder_weights}: keys do not look "
                    "like a torchvision ResNet state dict"
                )
            sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
            _load_strict(net, sd, cfg.encoder_weights)

    def backbone_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        net = self.backbone
        z = ((x + 1) * 0.5 - self.mean) / self.std
        stem = net.relu(net.bn1(net.conv1(z)))
        l1 = net.layer1(net.maxpool(stem))
        l2 = net.layer2(l1)
        l3 = net.layer3(l2)
        l4 = net.layer4(l3)
        deep = torch.cat([l3, fit_to(l4, tuple(l3.shape[-2:]))], dim=1)
        return [x, stem, l1, l2, deep], l4.mean(dim=(2, 3))


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: str) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"--encoder_weights {path}: does not match the encoder; "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def resolve_encoder(cfg: ModelConfig) -> tuple[str, str]:
    """(encoder kind, why): the single place that interprets ``encoder='auto'``."""
    if cfg.encoder != "auto":
        return cfg.encoder, f"--encoder {cfg.encoder}"
    if not cfg.encoder_weights:
        return "cnn", "auto: no --encoder_weights, so the small CPU-friendly CNN"
    path = Path(cfg.encoder_weights)
    if not path.is_file():
        raise WeightsError(f"--encoder_weights file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return "iresnet", "auto: .onnx weights are an InsightFace ArcFace model"
    if looks_like_torchvision_resnet(set(read_state_dict(path))):
        return "resnet50", "auto: the state dict's keys are torchvision ResNet's"
    return "iresnet", "auto: the state dict is not torchvision ResNet, so arcface_torch iresnet"


def describe_encoder_choice(cfg: ModelConfig) -> str:
    """One line naming the encoder, its weights and why it was chosen (the run prints it)."""
    kind, why = resolve_encoder(cfg)
    name = f"iresnet{cfg.iresnet_depth}" if kind == "iresnet" else kind
    weights = f"weights {cfg.encoder_weights}" if cfg.encoder_weights else "random init"
    frozen = ", backbone frozen" if cfg.freeze_backbone else ""
    return f"encoder: {name} ({weights}{frozen}) - {why}"


def build_encoder(cfg: ModelConfig) -> ImageEncoder:
    """The encoder ``resolve_encoder`` picks, with its local weights loaded."""
    kind, _ = resolve_encoder(cfg)
    if kind == "iresnet":
        return IResNetEncoder(cfg)
    if kind == "resnet50":
        return ResNet50Encoder(cfg)
    if kind == "cnn":
        return CNNEncoder(cfg)
    raise ValueError(f"ModelConfig.encoder: unknown encoder {kind!r}")
