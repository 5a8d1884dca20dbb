"""The training step: :class:`TrainEngine` (autocast, accumulation, DDP ``no_sync``, clipping,
skipping non-finite steps) and what one micro-batch reports.

DDP-aware without depending on a process group: ``no_sync`` is used when the model has it, and
the skip-on-non-finite decision is all-reduced only when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from controlnet_ray.config import OptimConfig
from controlnet_ray.engine.adversarial import AdversarialTerms, Adversary
from controlnet_ray.engine.amp import AmpSettings, _autocast
from controlnet_ray.engine.batch import Batch, _forward, move_batch
from controlnet_ray.engine.losses import LossTerms, compute_losses, pixel_weights, pose_scale_deg

ADVERSARY_STATE_KEY = "adversary"  # the discriminator's scaler and counters in the engine state


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run diverged and skipping will not save it."""


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
        total = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        norm = float(total)
        finite = math.isfinite(norm)
        # named before clipping, which spreads one NaN to every gradient
        where = "" if finite or self.amp.use_scaler else nonfinite_grad_parts(self.model)
        nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, total)
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
                self._register_nonfinite(what=f"gradient norm {norm}{where}")
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


def nonfinite_grad_parts(model: nn.Module) -> str:
    """Which top-level parts of ``model`` hold non-finite gradients, e.g. ``" in generator
    (12 of 30 tensors), encoder (40 of 40)"``: a gradient goes bad where it is made and
    everything upstream of it follows, so the part nearest the loss is where to look."""
    bad: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        part = name.removeprefix("module.").split(".")[0]
        counts = bad.setdefault(part, [0, 0])
        counts[0] += int(not torch.isfinite(p.grad).all())
        counts[1] += 1
    parts = [f"{k} ({n} of {t} tensors)" for k, (n, t) in bad.items() if n]
    return " in " + ", ".join(parts) if parts else ""
