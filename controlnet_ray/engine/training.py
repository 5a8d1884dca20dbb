"""The training step and evaluation loop, pure PyTorch.

This module must never import Ray: a GPU smoke check drives it on a bare machine, and the
Ray worker loop only wraps it (data in, metrics and state out).  It is DDP-aware without
depending on a process group: ``no_sync`` is used when the model has it, and the
skip-on-non-finite decision is all-reduced only when ``torch.distributed`` is initialised.

Loss definitions (``total = image + pose_loss_weight * pose + identity_loss_weight * identity``)
live here so training and evaluation can never disagree on them.  The adversarial option adds
``adversarial_loss_weight * hinge_generator_loss`` to what the generator minimises in training
only (evaluation has no discriminator), so ``total`` and the reported ``loss`` stay comparable
between training, validation and runs without the option.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from controlnet_ray.checkpoint import unwrap_model
from controlnet_ray.config import DEVICE_CHOICES, LOSS_TYPES, OptimConfig
from controlnet_ray.metrics import pose_abs_error_deg, psnr_per_image, ssim_per_image

Batch = Mapping[str, torch.Tensor]
BATCH_KEYS = ("source", "target", "source_pose", "target_pose")
MIN_LR_RATIO = 0.01  # cosine schedule ends at 1% of the peak learning rate
ADVERSARY_STATE_KEY = "adversary"  # the discriminator's scaler and counters in the engine state


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run diverged and skipping will not save it."""


class MissingIdentityEncoderError(RuntimeError):
    """An identity loss was requested but the model has no identity encoder loaded."""


def pose_scale_deg() -> float:
    """The pose head's normalisation (degrees per unit), owned by the model package.

    Imported at call time so this module does not pull the model in at import, and so
    there is exactly one definition of the constant.
    """
    from controlnet_ray.model import POSE_SCALE_DEG

    return float(POSE_SCALE_DEG)


# --------------------------------------------------------------------------- device


class DeviceError(ValueError):
    """A ``--device`` value this machine cannot honour; callers re-raise it in their own kind."""


def resolve_device(name: str) -> torch.device:
    """cpu | cuda | auto -> torch.device, the one rule for every CLI and benchmark script.

    ``cuda`` without a visible GPU is an error, not a fallback: a run that asked for a GPU and
    silently used the CPU would report misleading speeds.  Here (torch only, no Ray) so the
    Ray-free benchmark scripts and the inference CLIs share it.
    """
    if name not in DEVICE_CHOICES:
        raise DeviceError(f"--device must be cpu, cuda or auto, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device visible to torch here")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- AMP


@dataclass(frozen=True)
class AmpSettings:
    """How the forward pass runs: autocast on/off, its dtype, and whether a GradScaler is used."""

    enabled: bool
    dtype: torch.dtype
    use_scaler: bool
    description: str


def resolve_amp(use_amp: bool, device: torch.device) -> AmpSettings:
    """Pick the best mixed precision for ``device`` when ``--use_amp`` is set.

    bfloat16 has float32's exponent range, so it needs no loss scaling; float16 (only on
    CUDA devices without bf16, i.e. pre-Ampere) needs a GradScaler against underflow.
    """
    device = torch.device(device)
    if not use_amp:
        return AmpSettings(False, torch.float32, False, f"AMP: off (float32 on {device.type})")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return AmpSettings(
                True, torch.bfloat16, False, "AMP: bfloat16 autocast on cuda (no GradScaler)"
            )
        return AmpSettings(
            True,
            torch.float16,
            True,
            "AMP: float16 autocast on cuda with GradScaler (this GPU lacks bfloat16)",
        )
    if device.type == "cpu":
        return AmpSettings(
            True, torch.bfloat16, False, "AMP: bfloat16 autocast on cpu (no GradScaler)"
        )
    return AmpSettings(
        False,
        torch.float32,
        False,
        f"AMP: requested but not supported on {device.type}; running float32",
    )


def _autocast(device: torch.device, amp: AmpSettings) -> contextlib.AbstractContextManager:
    if not amp.enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp.dtype)


# --------------------------------------------------------------------------- optimiser


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; no weight decay on biases and norm scales.

    Decaying 1-D parameters (biases, BatchNorm/GroupNorm gains) only fights the
    normalisation and hurts; matrices and conv kernels (``ndim >= 2``) are decayed.
    Frozen parameters (``--freeze_generator``, frozen backbones) are left out so the
    optimiser state does not carry them.  The fused kernel is used when every parameter
    is on CUDA (one launch per step instead of one per tensor).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    groups = [
        {"params": ps, "weight_decay": wd}
        for ps, wd in ((decay, cfg.weight_decay), (no_decay, 0.0))
        if ps
    ]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def optimizer_steps_per_epoch(steps_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps in an epoch of ``steps_per_epoch`` micro-batches (partial group counts)."""
    return math.ceil(steps_per_epoch / accumulation)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine.

    Warm-up starts at ``1/warmup_steps`` (not 0, which would waste the first step) and
    reaches 1 on the last warm-up step; the cosine then decays to ``MIN_LR_RATIO`` at
    ``total_steps`` and stays there if training runs longer.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step LambdaLR: ``cfg.warmup_epochs`` of warm-up, cosine to 1% at the end.

    ``steps_per_epoch`` is in micro-batches (what the data loader yields per worker); it is
    converted to optimizer steps with ``ceil(steps_per_epoch / gradient_accumulation_steps)``
    because :class:`TrainEngine` also steps on a trailing partial accumulation group.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    per_epoch = optimizer_steps_per_epoch(steps_per_epoch, cfg.gradient_accumulation_steps)
    warmup, total = cfg.warmup_epochs * per_epoch, cfg.epochs * per_epoch

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- losses


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


# --------------------------------------------------------------------------- adversarial


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
    return torch.optim.Adam(params, lr=cfg.disc_lr, betas=(0.5, 0.999))


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


def move_batch(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Copy the four batch tensors to ``device`` as float32 (non-blocking from pinned memory)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; expected keys {list(BATCH_KEYS)}")
    raw = [k for k in BATCH_KEYS if batch[k].dtype == torch.uint8]
    if raw:  # the pipeline's uint8 images would silently train as 0..255
        raise TypeError(f"batch {raw} are uint8: normalise them first (data.batch.to_model_batch)")
    return {k: batch[k].to(device, dtype=torch.float32, non_blocking=True) for k in BATCH_KEYS}


def _forward(model: nn.Module, batch: Batch) -> Any:
    return model(
        batch["source"], batch["source_pose"], batch["target_pose"], target=batch["target"]
    )


# --------------------------------------------------------------------------- training


@dataclass
class StepMetrics:
    """What one micro-batch did.  Losses are undivided by accumulation (what you would log)."""

    loss: float
    image_loss: float
    pose_loss: float
    identity_loss: float
    skipped: bool  # non-finite loss: no backward, the accumulation group was dropped
    optimizer_step: bool  # an optimizer (and scheduler) step happened after this micro-batch
    lr: float  # learning rate this micro-batch's group is stepped with
    batch_size: int
    grad_norm: float | None = None  # pre-clip norm when a step was attempted (inf: skipped)
    adv_loss: float = 0.0  # the generator's hinge term (unweighted); 0 without the option
    disc_loss: float = 0.0  # the discriminator's hinge loss; 0 without the option


def _adv_floats(adv: AdversarialTerms | None) -> tuple[float, float]:
    """(generator term, discriminator loss) as floats; (0, 0) without the option."""
    if adv is None:
        return (0.0, 0.0)
    values = torch.stack([adv.gen, adv.disc]).detach().double().cpu().tolist()
    return (values[0], values[1])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class TrainEngine:
    """Runs micro-batches: autocast, accumulation, DDP ``no_sync``, clipping, skipping.

    Accumulation: each micro-batch's loss is divided by ``gradient_accumulation_steps`` and
    the optimizer steps every that many *finite* micro-batches.  When an epoch ends with a
    partial group (``is_last_in_epoch=True``), the gradients are multiplied by
    ``accumulation / group_size`` before clipping so that step uses the *mean* gradient of the
    micro-batches it saw, like a full step; the alternative (a silently shrunken step) would
    make the last step of every epoch depend on the dataset size.

    Non-finite losses: the micro-batch gets no backward and the group's partial gradients
    are dropped, so every step stays a clean mean over finite micro-batches and the group
    restarts.  Under DDP the decision is
    all-reduced, so every rank skips together and nobody waits in a collective.  After
    ``cfg.max_nonfinite_steps`` in a row (non-finite events since the last successful
    optimizer step) :class:`NonFiniteLossError` is raised.  A finite
    loss with non-finite gradients (fp16 overflow, handled by GradScaler; or a real
    blow-up) skips the optimizer step; without a scaler that also counts as non-finite.

    Under DDP ``is_last_in_epoch`` must be the same on every rank (equal shard lengths).

    Adversarial option (``cfg.adversarial_loss_weight > 0`` with an :class:`Adversary`): each
    micro-batch also computes the discriminator's hinge loss on its real targets against the
    detached generated images, and the generator minimises ``total + weight * (-D(generated))``
    against the discriminator as it was before this step (simultaneous updates).  The
    discriminator's gradients accumulate like the generator's (``no_sync`` on its DDP wrapper
    too) and it steps once per optimizer step, right after the generator, with the same
    partial-group rescale and ``grad_clip``, at ``disc_lr`` times the generator's current LR
    factor.  A non-finite value in either loss skips the micro-batch for both.  Without the
    option nothing of this runs and the step is exactly what it was.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        cfg: OptimConfig,
        device: torch.device,
        amp: AmpSettings,
        pose_scale: float | None = None,
        adversary: Adversary | None = None,
    ) -> None:
        """``pose_scale`` overrides ``POSE_SCALE_DEG`` (for stand-in models in tests);
        ``adversary`` is required when ``cfg.adversarial_loss_weight > 0``, unused otherwise."""
        if cfg.gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be >= 1, got {cfg.gradient_accumulation_steps}"
            )
        if cfg.adversarial_loss_weight > 0 and adversary is None:
            raise ValueError(
                f"adversarial_loss_weight is {cfg.adversarial_loss_weight} but no Adversary "
                "(discriminator and its optimizer) was given"
            )
        self.adversary = adversary if cfg.adversarial_loss_weight > 0 else None
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.cfg, self.device, self.amp = cfg, torch.device(device), amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp.use_scaler)
        self._scale_deg = pose_scale
        self._optimizer_steps = 0
        self._micro_steps = 0
        self._skipped_steps = 0
        self._overflow_steps = 0
        self._consecutive_nonfinite = 0
        self._group_size = 0  # finite micro-batches accumulated since the last step
        self.optimizer.zero_grad(set_to_none=True)

    # -- counters --------------------------------------------------------------------
    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps actually taken (the scheduler's step count)."""
        return self._optimizer_steps

    @property
    def micro_steps(self) -> int:
        """Micro-batches seen, skipped ones included."""
        return self._micro_steps

    @property
    def skipped_steps(self) -> int:
        """Micro-batches skipped because their loss was non-finite."""
        return self._skipped_steps

    @property
    def overflow_steps(self) -> int:
        """Optimizer steps skipped because the gradients were non-finite."""
        return self._overflow_steps

    @property
    def consecutive_nonfinite(self) -> int:
        """Non-finite events since the last successful optimizer step."""
        return self._consecutive_nonfinite

    # -- the step --------------------------------------------------------------------
    def train_micro_batch(self, batch: Batch, is_last_in_epoch: bool = False) -> StepMetrics:
        """Forward, backward and (every accumulation-th micro-batch) an optimizer step."""
        if self._scale_deg is None:
            self._scale_deg = pose_scale_deg()
        batch = move_batch(batch, self.device)
        self._micro_steps += 1
        will_step = is_last_in_epoch or self._group_size + 1 >= self.cfg.gradient_accumulation_steps
        lr = float(self.optimizer.param_groups[0]["lr"])
        with self._no_sync(will_step):
            with _autocast(self.device, self.amp):
                output = _forward(self.model, batch)
                adv = self._adversarial_terms(output, batch)
            terms = compute_losses(output, batch, self.cfg, self._scale_deg)
            values = terms.detached_floats()  # the step's one host sync (without DDP)
            adv_values = _adv_floats(adv)
            if self._any_rank_nonfinite(values[0] + sum(adv_values)):
                self._skip()
                return self._metrics(values, lr, batch, True, None, adv_values)
            self._backward(terms, adv)
        self._group_size += 1
        grad_norm = self._optimizer_step(lr) if will_step else None
        return self._metrics(values, lr, batch, False, grad_norm, adv_values)

    def _no_sync(self, will_step: bool) -> contextlib.ExitStack:
        """DDP's ``no_sync`` on the model (and discriminator) inside an accumulation group."""
        stack = contextlib.ExitStack()
        if will_step:
            return stack
        for net in (self.model, self.adversary and self.adversary.discriminator):
            if net is not None and hasattr(net, "no_sync"):
                stack.enter_context(net.no_sync())
        return stack

    def _adversarial_terms(self, output: Any, batch: Batch) -> AdversarialTerms | None:
        if self.adversary is None:
            return None
        weights = pixel_weights(output, self.cfg.background_loss_weight)
        return self.adversary.terms(output.image, batch, weights)

    def _backward(self, terms: LossTerms, adv: AdversarialTerms | None) -> None:
        """Each side's loss, divided by the accumulation, through its own scaler."""
        acc = self.cfg.gradient_accumulation_steps
        if adv is None:
            self.scaler.scale(terms.total / acc).backward()
            return
        objective = terms.total + self.cfg.adversarial_loss_weight * adv.gen
        self.scaler.scale(objective / acc).backward()
        self.adversary.scaler.scale(adv.disc / acc).backward()

    def _any_rank_nonfinite(self, loss: float) -> bool:
        """True if the loss is non-finite here or, under DDP, on any rank (a collective)."""
        bad = not math.isfinite(loss)
        if not _distributed():
            return bad
        flag = torch.tensor([float(bad)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _skip(self) -> None:
        """Drop this micro-batch and the group's partial gradients; raise if it keeps happening."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.adversary is not None:
            self.adversary.optimizer.zero_grad(set_to_none=True)
        self._group_size = 0
        self._skipped_steps += 1
        self._register_nonfinite(what="non-finite loss")

    @staticmethod
    def _metrics(
        values: tuple[float, float, float, float],
        lr: float,
        batch: Batch,
        skipped: bool,
        grad_norm: float | None,
        adv_values: tuple[float, float] = (0.0, 0.0),
    ) -> StepMetrics:
        loss, img, pose, ident = values
        adv_loss, disc_loss = adv_values
        return StepMetrics(
            loss=loss,
            image_loss=img,
            pose_loss=pose,
            identity_loss=ident,
            skipped=skipped,
            optimizer_step=grad_norm is not None and math.isfinite(grad_norm),
            lr=lr,
            batch_size=int(batch["source"].shape[0]),
            grad_norm=grad_norm,
            adv_loss=adv_loss,
            disc_loss=disc_loss,
        )

    def _register_nonfinite(self, what: str) -> None:
        self._consecutive_nonfinite += 1
        limit = self.cfg.max_nonfinite_steps
        if self._consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"training diverged: {self._consecutive_nonfinite} micro-batches in a row had a "
                f"non-finite loss or gradient (max_nonfinite_steps={limit}; the last one: {what}; "
                f"after {self._optimizer_steps} optimizer steps). Lower --lr, raise "
                "--warmup_epochs, check the data for NaNs, or try without --use_amp."
            )

    def _optimizer_step(self, lr: float | None = None) -> float:
        """Unscale, rescale a partial group, clip, step; returns the pre-clip grad norm.

        ``scaler.unscale_`` must come before clipping, or the clip threshold would apply to
        the loss-scaled gradients (65536x too large) and clip nothing.  ``lr`` is the LR this
        group was stepped with; the discriminator (when on) steps at the same schedule factor.
        """
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        factor = self.cfg.gradient_accumulation_steps / self._group_size
        if self._group_size < self.cfg.gradient_accumulation_steps:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(factor)
        norm = float(nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        finite = math.isfinite(norm)
        if finite or self.amp.use_scaler:
            self.scaler.step(self.optimizer)  # with a scaler, this itself skips on inf grads
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._group_size = 0
        if finite:
            self._optimizer_steps += 1
            self._consecutive_nonfinite = 0
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self._overflow_steps += 1
            if not self.amp.use_scaler:
                self._register_nonfinite(what=f"gradient norm {norm}")
        if self.adversary is not None:
            self._disc_step(factor, lr)
        return norm

    def _disc_step(self, group_factor: float, lr: float | None) -> None:
        """The discriminator's step, at ``disc_lr`` times the generator's schedule factor."""
        scale = 1.0 if lr is None else lr / self.cfg.lr
        norm = self.adversary.step(group_factor, self.cfg.grad_clip, self.cfg.disc_lr * scale)
        if not math.isfinite(norm) and not self.amp.use_scaler:
            self._register_nonfinite(what=f"discriminator gradient norm {norm}")

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Engine state for exact resume (model, optimizer and scheduler are saved by the caller).

        Take checkpoints at optimizer-step boundaries (epoch ends always are): gradients
        of a pending accumulation group are not part of the state.
        """
        state = {
            "scaler": self.scaler.state_dict(),
            "optimizer_steps": self._optimizer_steps,
            "micro_steps": self._micro_steps,
            "skipped_steps": self._skipped_steps,
            "overflow_steps": self._overflow_steps,
            "consecutive_nonfinite": self._consecutive_nonfinite,
        }
        if self.adversary is not None:
            state[ADVERSARY_STATE_KEY] = self.adversary.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; any pending accumulation group is discarded.

        The adversary's part is optional: a state saved without the option leaves a fresh
        discriminator scaler and counters.
        """
        required = [k for k in self.state_dict() if k != ADVERSARY_STATE_KEY]
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"engine state is missing {missing}; not a TrainEngine.state_dict()")
        if self.adversary is not None:
            self.adversary.load_state_dict(state.get(ADVERSARY_STATE_KEY) or {})
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self._optimizer_steps = int(state["optimizer_steps"])
        self._micro_steps = int(state["micro_steps"])
        self._skipped_steps = int(state["skipped_steps"])
        self._overflow_steps = int(state["overflow_steps"])
        self._consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self._group_size = 0
        self.optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- evaluation

_SUM_FIELDS = ("n", "loss_sum", "image_loss_sum", "pose_loss_sum", "psnr_sum", "ssim_sum")


@dataclass
class EvalSums:
    """Per-image sums over an evaluation pass, so workers can all-reduce them exactly."""

    n: float = 0.0
    loss_sum: float = 0.0
    image_loss_sum: float = 0.0
    pose_loss_sum: float = 0.0
    psnr_sum: float = 0.0
    ssim_sum: float = 0.0
    pose_abs_err_deg_sum: tuple[float, float, float] = (0.0, 0.0, 0.0)  # yaw, pitch, roll
    sample: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float64 ``[9]`` vector (the sample is not included) for ``dist.all_reduce``."""
        values = [getattr(self, f) for f in _SUM_FIELDS] + list(self.pose_abs_err_deg_sum)
        return torch.tensor(values, dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> EvalSums:
        """Inverse of :meth:`to_tensor`."""
        values = t.detach().double().cpu().tolist()
        if len(values) != len(_SUM_FIELDS) + 3:
            raise ValueError(f"expected {len(_SUM_FIELDS) + 3} values, got {len(values)}")
        return cls(*values[: len(_SUM_FIELDS)], pose_abs_err_deg_sum=tuple(values[-3:]))

    def __add__(self, other: EvalSums) -> EvalSums:
        merged = EvalSums.from_tensor(self.to_tensor() + other.to_tensor())
        merged.sample = self.sample if self.sample is not None else other.sample
        return merged

    def means(self) -> dict[str, float]:
        """Dataset means; raises if nothing was evaluated (an empty split is a setup error)."""
        if self.n <= 0:
            raise ValueError("no evaluation samples: the split is empty on every worker")
        yaw, pitch, roll = (s / self.n for s in self.pose_abs_err_deg_sum)
        return {
            "loss": self.loss_sum / self.n,
            "image_loss": self.image_loss_sum / self.n,
            "pose_loss": self.pose_loss_sum / self.n,
            "psnr": self.psnr_sum / self.n,
            "ssim": self.ssim_sum / self.n,
            "pose_mae_deg": (yaw + pitch + roll) / 3.0,
            "pose_mae_yaw": yaw,
            "pose_mae_pitch": pitch,
            "pose_mae_roll": roll,
        }


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _limited(batches: Iterable[Batch], max_batches: int | None) -> Iterator[Batch]:
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def _batch_sums(output: Any, batch: Batch, terms: LossTerms, scale_deg: float) -> torch.Tensor:
    """This batch's contribution as a float64 ``[9]`` device tensor (no host sync)."""
    b = batch["source"].shape[0]
    losses = torch.stack([terms.total, terms.image, terms.pose]).detach().double() * b
    psnr = psnr_per_image(output.image, batch["target"]).sum()
    ssim = ssim_per_image(output.image, batch["target"]).sum()
    quality = torch.stack([psnr, ssim]).double()
    pose_err = pose_abs_error_deg(output.pose_pred, batch["target_pose"], scale_deg).sum(0)
    n = torch.tensor([float(b)], dtype=torch.float64, device=losses.device)
    return torch.cat([n, losses, quality, pose_err.double()])


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    cfg: OptimConfig,
    device: torch.device,
    amp: AmpSettings,
    max_batches: int | None = None,
    keep_sample: bool = False,
    pose_scale: float | None = None,
) -> EvalSums:
    """Sum losses, PSNR, SSIM and pose errors over ``batches`` in eval mode, without grads.

    A DDP wrapper is bypassed (``model.module``): its forward may broadcast buffers, a
    collective that would hang when workers hold different numbers of validation batches.
    Sums stay on the device until the end (one sync).  ``keep_sample`` keeps the first
    batch's source/target/output (and poses) on the CPU for image logging.
    ``pose_scale`` overrides ``POSE_SCALE_DEG`` (for stand-in models in tests).
    """
    device = torch.device(device)
    net = unwrap_model(model)
    scale_deg = pose_scale if pose_scale is not None else pose_scale_deg()
    total = torch.zeros(len(_SUM_FIELDS) + 3, dtype=torch.float64, device=device)
    sample = None
    with _eval_mode(model), torch.no_grad():
        for batch in _limited(batches, max_batches):
            batch = move_batch(batch, device)
            with _autocast(device, amp):
                output = _forward(net, batch)
            terms = compute_losses(output, batch, cfg, scale_deg)
            total += _batch_sums(output, batch, terms, scale_deg)
            if keep_sample and sample is None:
                sample = _sample(batch, output)
    sums = EvalSums.from_tensor(total)
    sums.sample = sample
    return sums


def _sample(batch: Batch, output: Any) -> dict[str, torch.Tensor]:
    keep = {k: batch[k] for k in BATCH_KEYS} | {"output": output.image}
    return {k: v.detach().float().cpu() for k, v in keep.items()}


__all__ = [
    "Adversary",
    "AdversarialTerms",
    "AmpSettings",
    "EvalSums",
    "LossTerms",
    "MissingIdentityEncoderError",
    "NonFiniteLossError",
    "StepMetrics",
    "TrainEngine",
    "build_disc_optimizer",
    "build_optimizer",
    "build_scheduler",
    "compute_losses",
    "evaluate",
    "hinge_disc_loss",
    "hinge_gen_loss",
    "identity_loss",
    "image_loss",
    "lr_factor",
    "pose_loss",
    "pose_scale_deg",
    "resolve_amp",
]
