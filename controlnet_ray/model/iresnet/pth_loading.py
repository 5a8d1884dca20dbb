"""Loading an arcface_torch ``.pth`` state dict (and recognising what a state dict holds)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from controlnet_ray.model.iresnet.file_checks import (
    WeightsError,
    _check_depth,
    _input_size_from_fc,
    depth_from_layers,
)
from controlnet_ray.model.iresnet.network import IResNet, iresnet


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pth file, unwrapping {'state_dict': ...} and DDP's 'module.' prefix."""
    if Path(path).suffix.lower() == ".onnx":
        raise WeightsError(
            f"{path}: is an ONNX file; only the iresnet encoder reads ONNX (--encoder iresnet or "
            "auto), the others need a PyTorch state dict (.pth)"
        )
    try:
        try:  # mmap: deciding the encoder from the keys should not read 100 MB
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) files cannot be mmapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: cannot be read as a PyTorch state dict ({first_line})"
        ) from exc
    for key in ("state_dict", "model", "backbone"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict)")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def looks_like_iresnet(keys: set[str]) -> bool:
    """arcface_torch keys: PReLU slopes and the 'features' BatchNorm1d."""
    return "prelu.weight" in keys or "features.running_mean" in keys


def looks_like_torchvision_resnet(keys: set[str]) -> bool:
    """torchvision bottleneck ResNet keys (conv3 in blocks, no PReLU)."""
    return "layer1.0.conv3.weight" in keys and "fc.weight" in keys and not looks_like_iresnet(keys)


def load_iresnet_pth(path: str | Path, depth: int | None = None) -> IResNet:
    """arcface_torch state dict -> IResNet; ``depth`` (if given) must match the file."""
    sd = read_state_dict(path)
    if not looks_like_iresnet(set(sd)):
        raise WeightsError(f"{path}: keys do not look like an arcface_torch iresnet state dict")
    layers = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        layers.append(len(idx))
    file_depth = depth_from_layers(tuple(layers), str(path))
    _check_depth(file_depth, depth, path)
    fc_in = sd["fc.weight"].shape[1]
    input_size = _input_size_from_fc(fc_in, str(path))
    model = iresnet(file_depth, input_size=input_size)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{path}: state dict does not match iresnet{file_depth}; "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
