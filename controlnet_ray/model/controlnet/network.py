"""ImageControlNet: image encoder + U-Net generator + pose control branch + pose head.

* ``encoder`` turns the source face into feature maps at strides 1..16 and a global identity code.
* ``generator`` is a U-Net style decoder (coarsest scale first) that reads those maps as skips, so
  details of the source survive; it never sees poses itself.
* ``control`` is the ControlNet-style branch: it sees the encoder's maps and the source/target
  poses and injects FiLM scale/shift plus an additive feature map into the first
  ``num_control_layers`` decoder scales through zero-initialised projections, so an untrained
  branch leaves the generator's output exactly unchanged while gradients still reach it.
* ``generator="warp"`` (the default) moves pixels instead of averaging them: the encoder's maps
  are warped by the analytic motion of a 3D head proxy from the source to the target pose
  (:mod:`controlnet_ray.model.warp`; by default each person's own, ``head_shape``), so the
  U-Net's skips carry the *target's* layout; the decoder then predicts a residual flow
  (zero-initialised), a visibility mask and a fill, and the output is
  ``mask * warp(source, proxy + residual) * gain + (1 - mask) * fill``; the fill
  (``fill_seed``, default ``copy``) copies source pixels through a second learned flow
  (:mod:`controlnet_ray.model.controlnet.warp_head`).
  ``generator="plain"`` is the seed's U-Net (skips in the source's layout), kept for old
  checkpoints and comparison.
* ``pose_head`` regresses (yaw, pitch, roll) / ``POSE_SCALE_DEG`` from an image.
* An optional frozen ArcFace iresnet scores identity (cosine of embeddings); it is kept out of
  ``parameters()`` and ``state_dict()`` so optimisers and checkpoints do not depend on it.

This module holds the network itself (:class:`ImageControlNet`) and what its forward pass
returns; the parts live beside it: ``unet`` (the generator), ``control_branch``, ``pose_head``,
``warp_head`` (the warp generator's output composition) and ``building`` (``build_model`` and
facts about a built model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from controlnet_ray.config import ModelConfig
from controlnet_ray.model.controlnet.control_branch import ControlBranch
from controlnet_ray.model.controlnet.pose_head import PoseHead
from controlnet_ray.model.controlnet.unet import Generator, decoder_channels
from controlnet_ray.model.controlnet.warp_head import (
    SHAPE_CHANNELS,
    SHAPE_HEAD_MAX_LR,
    _init_warp_head,
    compose,
    learned_shape,
    needs_fill_grid,
    warp_channels,
)
from controlnet_ray.model.encoders import EncoderFeatures, ImageEncoder, build_encoder
from controlnet_ray.model.iresnet import IResNet, load_iresnet
from controlnet_ray.model.warp import face_grid, fixed_shape, head_region, proxy_flow, warp


@dataclass
class ModelOutput:
    """What ``ImageControlNet.forward`` returns (see docs/CONTRACTS.md)."""

    image: torch.Tensor
    pose_pred: torch.Tensor
    pose_pred_real: torch.Tensor | None = None
    identity_cos: torch.Tensor | None = None
    region: torch.Tensor | None = None  # [B,1,H,W] head pixels of the target pose (loss weight)


class ImageControlNet(nn.Module):
    """Generates the source face at the target pose; see the module docstring."""

    def __init__(self, cfg: ModelConfig, identity_weights: str | None = None) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.warp_mode = cfg.generator == "warp"
        self.fill_seed = cfg.fill_seed
        self.seen_side = cfg.seen_side
        self.head_proxy = cfg.head_proxy
        self.encoder: ImageEncoder = build_encoder(cfg)
        dec = decoder_channels(cfg.base_channels)
        out_channels = warp_channels(cfg.fill_seed) if self.warp_mode else 3
        self.generator = Generator(self.encoder.map_channels, dec, cfg.feature_dim, out_channels)
        if self.warp_mode:
            _init_warp_head(self.generator.to_rgb[0])
        self.shape_head = _build_shape_head(cfg) if self.warp_mode else None
        self.control = ControlBranch(
            self.encoder.map_channels, dec, cfg.num_control_layers, hidden=4 * cfg.base_channels
        )
        self.pose_head = PoseHead(cfg.base_channels)
        # Plain attribute, not a submodule: frozen, outside parameters()/state_dict().
        self.__dict__["identity_net"] = _load_identity(identity_weights or cfg.identity_weights)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> ImageControlNet:
        """Move/cast the hidden identity network together with the model (.to, .cuda, ...)."""
        super()._apply(fn, recurse)
        if self.identity_net is not None:
            self.identity_net._apply(fn)
        return self

    def peak_lr_caps(self) -> dict[str, float]:
        """Submodules whose peak learning rate the optimizer caps (``build_optimizer``)."""
        return {"shape_head": SHAPE_HEAD_MAX_LR} if self.shape_head is not None else {}

    def generate(
        self,
        source: torch.Tensor,
        source_pose: torch.Tensor,
        target_pose: torch.Tensor,
        use_control: bool = True,
    ) -> torch.Tensor:
        """The generated image only; ``use_control=False`` runs the bare generator."""
        return self._generate(source, source_pose, target_pose, use_control)[0]

    def _generate(
        self,
        source: torch.Tensor,
        source_pose: torch.Tensor,
        target_pose: torch.Tensor,
        use_control: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, head region of the target pose)."""
        _check_inputs(source, source_pose, target_pose)
        feats = self.encoder(source)
        height, width = source.shape[-2:]
        if not self.warp_mode:
            injections = self.control(feats, source_pose, target_pose) if use_control else None
            image = torch.tanh(self.generator(feats, injections))
            return image, head_region(target_pose, height, width).to(image.dtype)
        with_fill = needs_fill_grid(self.fill_seed)
        if self.shape_head is not None:
            shape = learned_shape(self.shape_head(feats.code), self.head_proxy)
        else:
            shape = fixed_shape(source.shape[0], source.device, self.head_proxy)
        flow = proxy_flow(source_pose, target_pose, height, width, with_fill, shape, self.seen_side)
        feats = EncoderFeatures([warp(m, flow.grid) for m in feats.maps], feats.code)
        injections = self.control(feats, source_pose, target_pose) if use_control else None
        image = compose(source, flow, self.generator(feats, injections), self.fill_seed)
        return image, flow.head.to(image.dtype)

    def forward(
        self,
        source: torch.Tensor,
        source_pose: torch.Tensor,
        target_pose: torch.Tensor,
        target: torch.Tensor | None = None,
    ) -> ModelOutput:
        image, region = self._generate(source, source_pose, target_pose)
        # Pose head with detached parameters: the pose loss on generated images moves only the
        # generator side.  Done inside forward so DDP sees one ordinary graph.
        params = {k: v.detach() for k, v in self.pose_head.named_parameters()}
        pose_pred = functional_call(self.pose_head, params, (image,))
        pose_pred_real = self.pose_head(target) if target is not None else None
        identity = self._identity_cos(image, target, target_pose)
        return ModelOutput(image, pose_pred, pose_pred_real, identity, region)

    def _identity_cos(
        self,
        image: torch.Tensor,
        target: torch.Tensor | None,
        target_pose: torch.Tensor,
    ) -> torch.Tensor | None:
        """ArcFace cosine of output and target, on face crops where the crops are head-framed
        (ArcFace was trained on aligned faces, a third of a head-framed crop)."""
        net = self.identity_net
        if net is None or target is None:
            return None
        if self.warp_mode:
            grid = face_grid(target_pose, net.input_size).to(image.dtype)
            image, target = warp(image, grid), warp(target, grid)
        with torch.no_grad():
            ref = net(_resize(target, net.input_size))
        emb = net(_resize(image, net.input_size))
        return F.cosine_similarity(emb.float(), ref.float(), dim=1)


def _build_shape_head(cfg: ModelConfig) -> nn.Linear | None:
    """``--head_shape learned``: identity code -> the proxy's shape (``learned_shape``), zeroed
    so an untrained model warps with the fixed proxy exactly."""
    if cfg.head_shape != "learned":
        return None
    head = nn.Linear(cfg.feature_dim, SHAPE_CHANNELS)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size
    )


def _check_inputs(
    source: torch.Tensor, source_pose: torch.Tensor, target_pose: torch.Tensor
) -> None:
    if source.dim() != 4 or source.shape[1] != 3 or source.shape[-1] % 16 or source.shape[-2] % 16:
        raise ValueError(
            f"source must be [B, 3, H, W] with H, W multiples of 16, got {tuple(source.shape)}"
        )
    for name, pose in (("source_pose", source_pose), ("target_pose", target_pose)):
        if tuple(pose.shape) != (source.shape[0], 3):
            raise ValueError(f"{name} must be [B, 3] degrees, got {tuple(pose.shape)}")


def _load_identity(path: str | None) -> IResNet | None:
    """Frozen, eval-mode ArcFace for the identity metric/loss, or None."""
    if path is None:
        return None
    net = load_iresnet(path)
    net.requires_grad_(False)
    return net.eval()
