"""Building the model and facts about it: ``build_model`` (with freezing applied),
``apply_freezing``, ``trainable_parameters``, ``model_signature`` (what a checkpoint must agree
on) and ``flops_per_sample`` (for MFU estimates)."""

from __future__ import annotations

import math

import torch
from torch import nn

from controlnet_ray.config import ModelConfig
from controlnet_ray.model.controlnet.network import ImageControlNet
from controlnet_ray.model.encoders import resolve_encoder


def build_model(cfg: ModelConfig, identity_weights: str | None = None) -> ImageControlNet:
    """The model for ``cfg`` with freezing applied (prints nothing)."""
    model = ImageControlNet(cfg, identity_weights)
    apply_freezing(model, cfg)
    return model


def apply_freezing(model: ImageControlNet, cfg: ModelConfig) -> None:
    """Set requires_grad from cfg: freeze_generator -> model.generator; freeze_backbone ->
    the encoder's pretrained backbone (and its BatchNorm statistics)."""
    for part in (model.encoder, model.generator, model.control, model.pose_head):
        part.requires_grad_(True)
    model.encoder.set_backbone_frozen(cfg.freeze_backbone)
    if cfg.freeze_generator:
        model.generator.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimiser should receive."""
    return [p for p in model.parameters() if p.requires_grad]


def model_signature(cfg: ModelConfig) -> dict[str, object]:
    """Architecture facts a checkpoint must agree on (used to name mismatches)."""
    kind, _ = resolve_encoder(cfg)
    return {
        "encoder": kind,
        "iresnet_depth": cfg.iresnet_depth if kind == "iresnet" else None,
        "feature_dim": cfg.feature_dim,
        "num_control_layers": cfg.num_control_layers,
        "image_size": cfg.image_size,
        "base_channels": cfg.base_channels,
        "generator": cfg.generator,
        # the warp generator's output channels depend on it; a plain model ignores it
        "fill_seed": cfg.fill_seed if cfg.generator == "warp" else None,
        # no parameters of its own, but weights learnt with one mapping misplace the other's fill
        "seen_side": cfg.seen_side if cfg.generator == "warp" else None,
        # the learned proxy shape has its own head (parameters); a plain model has no proxy
        "head_shape": cfg.head_shape if cfg.generator == "warp" else None,
        # no parameters of its own, but weights learnt on one proxy misplace the other's chin
        "head_proxy": cfg.head_proxy if cfg.generator == "warp" else None,
    }


def flops_per_sample(model: ImageControlNet, image_size: int) -> float:
    """Forward FLOPs (2 x MACs of Conv2d/ConvTranspose2d/Linear) for one sample with a target,
    counted with forward hooks on a batch of one; for MFU estimates."""
    macs = [0]

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.ConvTranspose2d):
            k = module.out_channels // module.groups * math.prod(module.kernel_size)
            macs[0] += inputs[0].numel() * k
        elif isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs[0] += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs[0] += output.numel() * module.in_features

    modules = list(model.modules())
    if model.identity_net is not None:
        modules += list(model.identity_net.modules())
    handles = [
        m.register_forward_hook(hook)
        for m in modules
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    pose = torch.zeros(1, 3, device=param.device, dtype=param.dtype)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x, pose, pose, target=x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return 2.0 * macs[0]
