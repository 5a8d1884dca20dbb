"""The loss definitions, shared by training and evaluation so they can never disagree:
``total = image + pose_loss_weight * pose + identity_loss_weight * identity``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from controlnet_ray.config import LOSS_TYPES, OptimConfig
from controlnet_ray.engine.batch import Batch


class MissingIdentityEncoderError(RuntimeError):
    """An identity loss was requested but the model has no identity encoder loaded."""


def pose_scale_deg() -> float:
    """The pose head's normalisation (degrees per unit), owned by the model package.

    Imported at call time so this module does not pull the model in at import, and so
    there is exactly one definition of the constant.
    """
    from controlnet_ray.model import POSE_SCALE_DEG

    return float(POSE_SCALE_DEG)


def image_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruction loss, computed in float32; a weighted mean over pixels with ``weight``.

    ``mse``; ``l1``; ``combined`` = MSE + L1 with weight 1.0 each.  (The original script's
    "combined" silently computed plain MSE; that was a bug, not a design.)  ``weight``
    ([B,1,H,W], broadcast over channels) is normalised by its own mean, so the loss keeps the
    scale of an unweighted one and the learning rate means the same with or without it.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    diff = pred.float() - target.float()
    per_pixel = torch.zeros_like(diff)
    if loss_type in ("mse", "combined"):
        per_pixel = per_pixel + diff.pow(2)
    if loss_type in ("l1", "combined"):
        per_pixel = per_pixel + diff.abs()
    if weight is None:
        return per_pixel.mean()
    w = weight.float().expand_as(per_pixel)
    return (per_pixel * w).sum() / w.sum().clamp(min=1e-12)


def pixel_weights(output: Any, background_weight: float) -> torch.Tensor | None:
    """Per-pixel image-loss weights: 1 on the target's head (``output.region``), the
    background weight elsewhere; None (uniform) when the model gives no region or the
    background counts fully."""
    region = getattr(output, "region", None)
    if region is None or background_weight >= 1.0:
        return None
    return background_weight + (1.0 - background_weight) * region.float()


def pose_loss(output: Any, target_pose_deg: torch.Tensor, scale_deg: float) -> torch.Tensor:
    """MSE of the pose head on the generated image, plus on the real target when present.

    The generated-image term pushes the generator towards the requested pose (the head is
    detached in that branch); the real-image term is what trains the head itself.
    """
    goal = target_pose_deg.float() / scale_deg
    loss = nn.functional.mse_loss(output.pose_pred.float(), goal)
    if getattr(output, "pose_pred_real", None) is not None:
        loss = loss + nn.functional.mse_loss(output.pose_pred_real.float(), goal)
    return loss


def identity_loss(output: Any, weight: float) -> torch.Tensor | None:
    """``1 - mean(identity_cos)`` when the identity loss is on; None when its weight is 0."""
    if weight <= 0:
        return None
    cos = getattr(output, "identity_cos", None)
    if cos is None:
        raise MissingIdentityEncoderError(
            f"--identity_loss_weight is {weight} but the model returned no identity_cos: "
            "it has no identity (ArcFace) encoder loaded. Pass --encoder_weights with ArcFace "
            "weights, or set --identity_loss_weight 0."
        )
    return 1.0 - cos.float().mean()


@dataclass
class LossTerms:
    """The weighted total and its (unweighted) parts, all scalar tensors."""

    total: torch.Tensor
    image: torch.Tensor
    pose: torch.Tensor
    identity: torch.Tensor

    def detached_floats(self) -> tuple[float, float, float, float]:
        """All four as Python floats with a single device sync."""
        values = torch.stack([self.total, self.image, self.pose, self.identity]).detach()
        return tuple(values.double().cpu().tolist())


def compute_losses(output: Any, batch: Batch, cfg: OptimConfig, scale_deg: float) -> LossTerms:
    """``total = image + pose_loss_weight * pose + identity_loss_weight * identity``."""
    weights = pixel_weights(output, cfg.background_loss_weight)
    img = image_loss(output.image, batch["target"], cfg.loss_type, weights)
    pose = pose_loss(output, batch["target_pose"], scale_deg)
    ident = identity_loss(output, cfg.identity_loss_weight)
    total = img + cfg.pose_loss_weight * pose
    if ident is not None:
        total = total + cfg.identity_loss_weight * ident
    else:
        ident = torch.zeros((), device=img.device)
    return LossTerms(total, img, pose, ident)
