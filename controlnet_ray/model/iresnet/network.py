"""The ArcFace iResNet network (:class:`IResNet`), its named depths and constructor.

It mirrors ``recognition/arcface_torch/backbones/iresnet.py`` so that an arcface_torch ``.pth``
state dict loads with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from controlnet_ray.model.iresnet.blocks import IBasicBlock, _bn_or_identity, _conv

IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 2),
}
STAGE_WIDTHS = (64, 128, 256, 512)
EMBEDDING_DIM = 512
ARCFACE_INPUT_SIZE = 112


class IResNet(nn.Module):
    """ArcFace iResNet; ``forward`` returns the 512-d embedding, ``forward_features`` also maps.

    ``input_size`` sets the fc width (arcface_torch hard-codes 112 -> 7x7); smaller sizes exist
    only so tests can run fast.  ``fused`` builds the BN-folded form used for ONNX weights.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int] | list[int],
        input_size: int = ARCFACE_INPUT_SIZE,
        num_features: int = EMBEDDING_DIM,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if input_size % 16:
            raise ValueError(f"IResNet input_size must be a multiple of 16, got {input_size}")
        self.layers_spec = tuple(int(n) for n in layers)
        self.input_size = input_size
        self.fused = fused
        self.conv1 = _conv(3, 64, 3, 1, fused)
        self.bn1 = _bn_or_identity(64, fused)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        stages = []
        for planes, blocks in zip(STAGE_WIDTHS, self.layers_spec, strict=True):
            stage = [IBasicBlock(inplanes, planes, 2, fused)]
            stage += [IBasicBlock(planes, planes, 1, fused) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * (input_size // 16) ** 2, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        """arcface_torch's init (normal(0, 0.1) convs, unit BNs); runs before any loading."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Feature maps at strides 1, 2, 4, 8, 16 (64..512 channels) and the embedding."""
        stem = self.prelu(self.bn1(self.conv1(x)))
        maps = [stem]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            maps.append(stage(maps[-1]))
        emb = self.features(self.fc(self.dropout(torch.flatten(self.bn2(maps[-1]), 1))))
        return maps, emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


def iresnet(depth: int, input_size: int = ARCFACE_INPUT_SIZE, fused: bool = False) -> IResNet:
    """Randomly initialised iresnet{18,34,50,100}."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"iresnet depth must be one of {sorted(IRESNET_LAYERS)}, got {depth}")
    return IResNet(IRESNET_LAYERS[depth], input_size=input_size, fused=fused)
