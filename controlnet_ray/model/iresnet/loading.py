"""Loading iresnet weights from a local file, whichever of the two formats it is."""

from __future__ import annotations

from pathlib import Path

from controlnet_ray.model.iresnet.file_checks import WeightsError
from controlnet_ray.model.iresnet.network import IResNet
from controlnet_ray.model.iresnet.onnx_folding import load_iresnet_onnx
from controlnet_ray.model.iresnet.pth_loading import load_iresnet_pth


def load_iresnet(path: str | Path, depth: int | None = None) -> IResNet:
    """Load an iresnet from a local .onnx (InsightFace release) or .pth (arcface_torch)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"iresnet weights file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return load_iresnet_onnx(path, depth)
    return load_iresnet_pth(path, depth)
