"""ImageControlNet, one module per part (the old ``controlnet_ray.model.controlnet`` module).

Modules: ``network`` (:class:`ImageControlNet`, :class:`ModelOutput`; its docstring describes
the whole model), ``unet`` (the U-Net decoder, ``generator``), ``control_branch`` (the pose
control branch, ``control``), ``pose_head`` (``pose_head``, ``POSE_SCALE_DEG``), ``warp_head``
(how ``generator="warp"`` composes its image) and ``building`` (``build_model``, freezing,
``model_signature``, ``flops_per_sample``).  The submodule attribute names, and so the
``state_dict`` keys of checkpoints, are those of the single module this package replaced; the
names below keep every ``controlnet_ray.model.controlnet.<name>`` import working.
"""

from controlnet_ray.model.controlnet.building import (
    apply_freezing,
    build_model,
    flops_per_sample,
    model_signature,
    trainable_parameters,
)
from controlnet_ray.model.controlnet.control_branch import (
    POSE_FEATURES,
    ControlBranch,
    encode_poses,
)
from controlnet_ray.model.controlnet.network import ImageControlNet, ModelOutput
from controlnet_ray.model.controlnet.pose_head import POSE_SCALE_DEG, PoseHead
from controlnet_ray.model.controlnet.unet import (
    NUM_SCALES,
    Generator,
    Injection,
    decoder_channels,
    decoder_view,
    decoder_view_channels,
)
from controlnet_ray.model.controlnet.warp_head import (
    COPY_PRIOR,
    COPY_REACH,
    FLOW_RESIDUAL_SCALE,
    MASK_PRIOR,
    SHAPE_CENTRE_REACH,
    SHAPE_RADII_REACH,
    WARP_CHANNELS,
    compose,
    fill_seed_image,
    head_colour,
    learned_shape,
    warp_channels,
)

__all__ = [
    "COPY_PRIOR",
    "COPY_REACH",
    "FLOW_RESIDUAL_SCALE",
    "MASK_PRIOR",
    "NUM_SCALES",
    "POSE_FEATURES",
    "POSE_SCALE_DEG",
    "SHAPE_CENTRE_REACH",
    "SHAPE_RADII_REACH",
    "WARP_CHANNELS",
    "ControlBranch",
    "Generator",
    "ImageControlNet",
    "Injection",
    "ModelOutput",
    "PoseHead",
    "apply_freezing",
    "build_model",
    "compose",
    "decoder_channels",
    "decoder_view",
    "decoder_view_channels",
    "encode_poses",
    "fill_seed_image",
    "flops_per_sample",
    "head_colour",
    "learned_shape",
    "model_signature",
    "trainable_parameters",
    "warp_channels",
]
