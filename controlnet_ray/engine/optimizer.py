"""The generator's optimiser (AdamW, no decay on 1-D parameters) and its LR schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from controlnet_ray.config import OptimConfig

MIN_LR_RATIO = 0.01  # cosine schedule ends at 1% of the peak learning rate


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; no weight decay on biases and norm scales.

    Decaying 1-D parameters (biases, BatchNorm/GroupNorm gains) only fights the
    normalisation and hurts; matrices and conv kernels (``ndim >= 2``) are decayed.
    Frozen parameters (``--freeze_generator``, frozen backbones) are left out so the
    optimiser state does not carry them.  The fused kernel is used when every parameter
    is on CUDA (:func:`use_fused`).  A model may name submodules whose peak learning rate is
    capped (``model.peak_lr_caps()``: prefix -> cap; :func:`cap_peak_lr`).
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
    fused = use_fused(p.device for p in decay + no_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    for prefix, cap in getattr(model, "peak_lr_caps", dict)().items():
        capped = [p for n, p in model.named_parameters() if n.startswith(prefix + ".")]
        cap_peak_lr(optimizer, [p for p in capped if p.requires_grad], cap, cfg.lr)
    return optimizer


def cap_peak_lr(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], cap: float, peak_lr: float
) -> bool:
    """Make ``params`` learn at ``min(1, cap / peak_lr)`` times the optimizer's learning rate,
    through the whole schedule; True if that is below 1 (else nothing is done).

    Each step's change of those parameters is scaled after the step (step hooks), which for
    AdamW is exactly a parameter group at the scaled rate: the moments do not depend on the
    rate, and decoupled weight decay scales with it. Unlike a group, it leaves the optimizer's
    ``state_dict`` as it was, so checkpoints resume across the change either way.
    """
    factor = min(1.0, cap / peak_lr)
    if factor >= 1.0 or not params:
        return False
    before: list[torch.Tensor] = []

    def snapshot(*_: object) -> None:
        before[:] = [p.detach().clone() for p in params]

    def scale_change(*_: object) -> None:
        with torch.no_grad():
            for p, old in zip(params, before, strict=True):
                p.sub_(old).mul_(factor).add_(old)

    optimizer.register_step_pre_hook(snapshot)
    optimizer.register_step_post_hook(scale_change)
    return True


def use_fused(devices: Iterable[torch.device | str]) -> bool:
    """Whether an Adam-family optimiser over parameters on ``devices`` should be fused.

    On CUDA the fused kernel updates every parameter in one launch per step instead of
    several per tensor (at the default model's ~100 tensors and ~10k samples/s, launches are
    what the step waits on). Elsewhere the default implementation stays: the CPU path is
    unchanged, and fused kernels need all parameters on one kind of accelerator.
    """
    kinds = {torch.device(d).type for d in devices}
    return kinds == {"cuda"}


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
