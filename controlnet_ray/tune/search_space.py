"""What a sweep tries and optimises: the grid of loss type x pose-loss weight (x lr) x repeats,
the scheduler options, and the metric (val PSNR, max) trials are ranked by."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from controlnet_ray.config import LOSS_TYPES, ConfigError, TrainConfig
from controlnet_ray.run_files import score_order

# Trials are ranked by PSNR whatever their --best_metric: val_loss is not comparable across
# loss types, which a sweep varies. Its direction is the best-model policy's (run_files).
METRIC, TIME_ATTR = "val_psnr", "epoch"
MODE = score_order(METRIC)
SCHEDULERS = ("asha", "none")


@dataclass
class SweepOptions:
    """The search space and how the sweep is run (everything that is not a training flag)."""

    sweep_name: str = "controlnet_sweep"
    loss_types: tuple[str, ...] = LOSS_TYPES
    pose_loss_weights: tuple[float, ...] = (0.01, 0.1, 0.5)
    lrs: tuple[float, ...] | None = None  # None: the training flag --lr for every trial
    num_samples: int = 1  # repeats of every grid point, seeds --seed + 0..num_samples-1
    max_concurrent_trials: int | None = None  # None: as many as the CPUs/GPUs allow
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0

    def grid_size(self) -> int:
        lrs = len(self.lrs) if self.lrs else 1
        return len(self.loss_types) * len(self.pose_loss_weights) * lrs * self.num_samples


def validate_sweep(cfg: TrainConfig, opts: SweepOptions) -> None:
    """Check every swept value through TrainConfig's own validation, naming the sweep flag."""
    name = opts.sweep_name
    if not name or any(not (c.isalnum() or c in "-_.") for c in name):
        raise ConfigError(f"--sweep_name must be letters, digits, '-', '_' or '.', got {name!r}")
    for flag, values, field in (
        ("--loss_types", opts.loss_types, "loss_type"),
        ("--pose_loss_weights", opts.pose_loss_weights, "pose_loss_weight"),
        ("--lrs", opts.lrs or (), "lr"),
    ):
        if len(set(values)) != len(values):
            raise ConfigError(f"{flag} has duplicates: {list(values)}")
        for v in values:
            try:  # replace() checks the section's values, validate() the rest
                optim = dataclasses.replace(cfg.optim, **{field: v})
                dataclasses.replace(cfg, optim=optim).validate()
            except ConfigError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
    if opts.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1, got {opts.num_samples}")
    if opts.max_concurrent_trials is not None and opts.max_concurrent_trials < 1:
        raise ConfigError(f"--max_concurrent_trials must be >= 1, got {opts.max_concurrent_trials}")
    if opts.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {{asha,none}}, got {opts.scheduler!r}")
    if not 1 <= opts.grace_period <= cfg.optim.epochs:
        raise ConfigError(
            f"--grace_period must be in 1..--epochs ({cfg.optim.epochs}), got {opts.grace_period}"
        )
    if not opts.reduction_factor > 1:
        raise ConfigError(f"--reduction_factor must be > 1, got {opts.reduction_factor}")


def param_space(opts: SweepOptions) -> dict[str, Any]:
    """A full grid: every loss type x pose weight (x lr) x repeat is one trial."""
    from ray import tune

    space: dict[str, Any] = {
        "loss_type": tune.grid_search(list(opts.loss_types)),
        "pose_loss_weight": tune.grid_search(list(opts.pose_loss_weights)),
        "repeat": tune.grid_search(list(range(opts.num_samples))),
    }
    if opts.lrs:
        space["lr"] = tune.grid_search(list(opts.lrs))
    return space
