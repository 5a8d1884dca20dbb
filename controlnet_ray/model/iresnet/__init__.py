"""InsightFace ArcFace iResNet (arcface_torch layout) and its weight loaders.

The network mirrors ``recognition/arcface_torch/backbones/iresnet.py`` so that an arcface_torch
``.pth`` state dict loads with ``strict=True``; released InsightFace ONNX files arrive with
every BatchNorm folded into its conv and load into a *fused* network that reproduces them
exactly (see ``onnx_folding``).

Modules: ``blocks`` (:class:`IBasicBlock` and its layers), ``network`` (:class:`IResNet`, the
named depths, :func:`iresnet`), ``file_checks`` (:class:`WeightsError`, what a file must agree
on), ``pth_loading`` (arcface_torch state dicts), ``onnx_folding`` (ONNX graphs) and
``loading`` (:func:`load_iresnet`, either format).  This package replaced the single module
``controlnet_ray.model.iresnet``; the names below keep its imports working.
"""

from controlnet_ray.model.iresnet.blocks import IBasicBlock
from controlnet_ray.model.iresnet.file_checks import WeightsError, depth_from_layers
from controlnet_ray.model.iresnet.loading import load_iresnet
from controlnet_ray.model.iresnet.network import (
    ARCFACE_INPUT_SIZE,
    EMBEDDING_DIM,
    IRESNET_LAYERS,
    STAGE_WIDTHS,
    IResNet,
    iresnet,
)
from controlnet_ray.model.iresnet.onnx_folding import load_iresnet_onnx
from controlnet_ray.model.iresnet.pth_loading import (
    load_iresnet_pth,
    looks_like_iresnet,
    looks_like_torchvision_resnet,
    read_state_dict,
)

__all__ = [
    "ARCFACE_INPUT_SIZE",
    "EMBEDDING_DIM",
    "IRESNET_LAYERS",
    "STAGE_WIDTHS",
    "IBasicBlock",
    "IResNet",
    "WeightsError",
    "depth_from_layers",
    "iresnet",
    "load_iresnet",
    "load_iresnet_onnx",
    "load_iresnet_pth",
    "looks_like_iresnet",
    "looks_like_torchvision_resnet",
    "read_state_dict",
]
