"""What a sweep tries and optimises: the grid of loss type x pose-loss weight (x lr) x repeats,
the scheduler options, and the metric trials are ranked by (``--best_metric``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from controlnet_ray.config import LOSS_TYPES, ConfigError, TrainConfig
from controlnet_ray.run_files import ScoreOrder, score_order

TIME_ATTR = "epoch"
SCHEDULERS = ("asha", "none")
GRACE_FRACTION = 4  # ASHA's default grace period: a quarter of --epochs (at least 1)


def sweep_metric(cfg: TrainConfig) -> tuple[str, ScoreOrder]:
    """The metric (and its direction) ASHA and the final table rank trials by: ``--best_metric``,
    the one Train keeps checkpoints and ``best_model.pth`` by, so a trial's best epoch is one
    whose checkpoint Train kept."""
    return cfg.output.best_metric, score_order(cfg.output.best_metric)


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
    grace_period: int | None = None  # None: a quarter of --epochs (grace_epochs)
    reduction_factor: float = 2.0

    def grid_size(self) -> int:
        lrs = len(self.lrs) if self.lrs else 1
        return len(self.loss_types) * len(self.pose_loss_weights) * lrs * self.num_samples

    def grace_epochs(self, epochs: int) -> int:
        """Epochs every trial runs before ASHA may stop it: ``--grace_period``, else a quarter
        of ``--epochs`` (at least 1). Loss types and weights learn at different speeds, so a
        cut after the first epoch would rank how fast a trial starts, not where it goes."""
        if self.grace_period is not None:
            return self.grace_period
        return max(1, epochs // GRACE_FRACTION)


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
    _check_metric(cfg, opts)
    if opts.grace_period is not None and not 1 <= opts.grace_period <= cfg.optim.epochs:
        raise ConfigError(
            f"--grace_period must be in 1..--epochs ({cfg.optim.epochs}), got {opts.grace_period}"
        )
    if not opts.reduction_factor > 1:
        raise ConfigError(f"--reduction_factor must be > 1, got {opts.reduction_factor}")


def _check_metric(cfg: TrainConfig, opts: SweepOptions) -> None:
    """val_loss ranks only trials of one loss: its scale changes with --loss_type and with the
    pose-loss weight."""
    if cfg.output.best_metric == "val_loss" and (
        len(opts.loss_types) > 1 or len(opts.pose_loss_weights) > 1
    ):
        raise ConfigError(
            "--best_metric val_loss cannot rank trials of several --loss_types or "
            "--pose_loss_weights (their losses have other scales); use val_psnr_face or val_psnr"
        )


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
