"""The ``--adversarial_loss_weight`` option: hinge losses, the discriminator's optimiser and
:class:`Adversary` (module, optimiser, own scaler), driven by the training step."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from controlnet_ray.checkpoint import unwrap_model
from controlnet_ray.config import OptimConfig
from controlnet_ray.engine.amp import AmpSettings
from controlnet_ray.engine.batch import Batch
from controlnet_ray.engine.optimizer import use_fused


def patch_weights(weights: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    """Pixel weights ([B,1,H,W]) averaged down to the patch map's size, or None (uniform)."""
    if weights is None:
        return None
    return nn.functional.adaptive_avg_pool2d(weights.float(), logits.shape[-2:])


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    w = weights.expand_as(values)
    return (values * w).sum() / w.sum().clamp(min=1e-12)


def hinge_disc_loss(
    real: torch.Tensor, fake: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The discriminator's hinge loss ``mean relu(1 - D(real)) + mean relu(1 + D(fake))``.

    Computed in float32; ``weights`` (patch-map sized) makes each mean a weighted one, so
    background patches can count less, as in the image loss.
    """
    real, fake = real.float(), fake.float()
    return _weighted_mean(torch.relu(1.0 - real), weights) + _weighted_mean(
        torch.relu(1.0 + fake), weights
    )


def hinge_gen_loss(fake: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The generator's hinge term ``-mean D(generated)`` (float32, weighted like the critic's)."""
    return -_weighted_mean(fake.float(), weights)


@dataclass
class AdversarialTerms:
    """``gen``: the generator's (unweighted) hinge term; ``disc``: the discriminator's loss."""

    gen: torch.Tensor
    disc: torch.Tensor


def build_disc_optimizer(discriminator: nn.Module, cfg: OptimConfig) -> torch.optim.Adam:
    """Adam at ``cfg.disc_lr`` with beta1 0.5 (the GAN default: less momentum against a moving
    target) and no weight decay (spectral norm already bounds the critic)."""
    params = [p for p in discriminator.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the discriminator has no trainable parameters")
    fused = {"fused": True} if use_fused(p.device for p in params) else {}  # CPU: as before
    return torch.optim.Adam(params, lr=cfg.disc_lr, betas=(0.5, 0.999), **fused)


@contextlib.contextmanager
def _frozen_critic(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode with ``requires_grad`` off: the generator's adversarial term
    flows through it to the image but must neither train it nor advance its spectral-norm
    power iteration (only the discriminator's own forward does)."""
    params = [p for p in module.parameters() if p.requires_grad]
    was_training = module.training
    module.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        module.train(was_training)


class Adversary:
    """The discriminator side of ``--adversarial_loss_weight``: module, optimiser, own scaler.

    ``discriminator`` may be DDP-wrapped by the caller (as the model is); its optimiser holds
    the bare module's parameters (:func:`build_disc_optimizer`).  It has its own GradScaler
    (enabled exactly when the generator's is): fp16 overflows of the two losses are
    independent, and one shared scale would let either side's overflow skip the other's step.
    :class:`TrainEngine` drives it: it accumulates, clips, skips and steps with the generator's
    optimizer step, once per optimizer step.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        amp: AmpSettings,
    ) -> None:
        self.discriminator, self.optimizer = discriminator, optimizer
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=amp.use_scaler)
        self.steps = 0  # discriminator optimizer steps taken
        self.overflow_steps = 0  # discriminator steps skipped for non-finite gradients
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def bare(self) -> nn.Module:
        """The module under a DDP wrapper (its forward runs no collective)."""
        return unwrap_model(self.discriminator)

    def terms(self, image: torch.Tensor, batch: Batch, weights: torch.Tensor | None):
        """Both hinge losses for generated ``image`` against the real ``batch["target"]``.

        The critic's forward sees real and (detached) generated images as one batch: one
        (DDP) forward per backward and one power iteration per step.  The generator's term
        goes through the bare, frozen module (:func:`_frozen_critic`).
        """
        pose = batch["target_pose"]
        both = torch.cat([batch["target"], image.detach()])
        logits = self.discriminator(both, torch.cat([pose, pose]))
        real, fake = logits.chunk(2)
        pw = patch_weights(weights, logits)
        with _frozen_critic(self.bare):
            gen_logits = self.bare(image, pose)
        return AdversarialTerms(hinge_gen_loss(gen_logits, pw), hinge_disc_loss(real, fake, pw))

    def step(self, group_factor: float, grad_clip: float, lr: float) -> float:
        """Unscale, rescale a partial group, clip and step at ``lr``; returns the pre-clip
        gradient norm (non-finite: the step was skipped)."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if group_factor != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(group_factor)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        norm = float(nn.utils.clip_grad_norm_(params, grad_clip))
        finite = math.isfinite(norm)
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.steps += 1
        else:
            self.overflow_steps += 1
        return norm

    def state_dict(self) -> dict[str, Any]:
        """Scaler and counters (the caller saves the module's and the optimiser's state)."""
        return {
            "scaler": self.scaler.state_dict(),
            "steps": self.steps,
            "overflow_steps": self.overflow_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.steps = int(state.get("steps", 0))
        self.overflow_steps = int(state.get("overflow_steps", 0))
        self.optimizer.zero_grad(set_to_none=True)
