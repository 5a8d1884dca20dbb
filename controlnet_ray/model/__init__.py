"""ImageControlNet model: encoders, U-Net generator, pose control branch, pose head.

Public API (see docs/CONTRACTS.md): ``build_model``, ``ImageControlNet``, ``ModelOutput``,
``POSE_SCALE_DEG``, ``apply_freezing``, ``trainable_parameters``, ``describe_encoder_choice``,
``model_signature``, ``flops_per_sample``; iresnet loaders for ArcFace ``.pth``/``.onnx`` files.
"""

from controlnet_ray.model.controlnet import (
    POSE_SCALE_DEG,
    ImageControlNet,
    ModelOutput,
    apply_freezing,
    build_model,
    encode_poses,
    flops_per_sample,
    model_signature,
    trainable_parameters,
)
from controlnet_ray.model.encoders import describe_encoder_choice, resolve_encoder
from controlnet_ray.model.iresnet import IResNet, WeightsError, iresnet, load_iresnet

__all__ = [
    "POSE_SCALE_DEG",
    "IResNet",
    "ImageControlNet",
    "ModelOutput",
    "WeightsError",
    "apply_freezing",
    "build_model",
    "describe_encoder_choice",
    "encode_poses",
    "flops_per_sample",
    "iresnet",
    "load_iresnet",
    "model_signature",
    "resolve_encoder",
    "trainable_parameters",
]
