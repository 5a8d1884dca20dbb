"""The one resume path (Ray-free): ``--resume`` planning (continue or warm-start), the state
carried across epochs, and restoring weights, then optimiser, scheduler, engine and RNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from controlnet_ray import run_files
from controlnet_ray.checkpoint.compatibility import _state_dict_diffs, check_model_compat
from controlnet_ray.checkpoint.contents import unwrap_model
from controlnet_ray.checkpoint.format import (
    DISC_KEY,
    DISC_OPTIMIZER_KEY,
    FRESH_START_EPOCH,
    CheckpointError,
)
from controlnet_ray.checkpoint.loading import _source
from controlnet_ray.checkpoint.rng import restore_rng_state, rng_state_for_rank, seed_rank_streams
from controlnet_ray.config import TrainConfig


@dataclass(frozen=True)
class ResumePlan:
    """What ``--resume`` does.

    ``restore_optimizer=True``: continue the same run: weights, optimiser, scheduler, scaler
    (``engine_state``), RNG, best metrics and histories come from the file; ``start_epoch`` is
    the saved epoch + 1.

    ``restore_optimizer=False`` (the original's stage-2 recipe, e.g. unfreezing the generator
    with a lower ``--lr``): only the weights are loaded; a fresh optimiser and LR schedule are
    built for the new trainable set, ``start_epoch`` is 1, histories start empty and best
    metrics reset, so this stage's ``best_model.pth`` is chosen among its own epochs.
    """

    restore_optimizer: bool
    reason: str
    start_epoch: int


def plan_resume(
    state: Mapping[str, Any], cfg: TrainConfig, trainable_names: Sequence[str]
) -> ResumePlan:
    """Decide between an exact continuation and a weights-only warm start (see ResumePlan)."""
    source = _source(state)
    changes = _trainable_change(state, trainable_names) + _hparam_changes(state, cfg)
    if "optimizer_state_dict" not in state:
        changes.append("checkpoint holds no optimizer state")
    if changes:
        reason = (
            f"{'; '.join(changes)}: fresh optimizer and schedule, weights loaded from {source}, "
            f"epoch counter restarts at {FRESH_START_EPOCH}, history and best metrics start empty"
        )
        return ResumePlan(False, reason, FRESH_START_EPOCH)
    epoch = int(state.get("epoch", -1))
    reason = (
        f"resumed model, optimizer, scheduler, scaler and history from {source} at epoch {epoch}"
    )
    if epoch >= cfg.optim.epochs:
        reason += f" (already at --epochs {cfg.optim.epochs}: nothing left to train)"
    return ResumePlan(True, reason, epoch + 1)


def _trainable_change(state: Mapping[str, Any], current: Sequence[str]) -> list[str]:
    saved = state.get("trainable")
    if saved is None:  # original script's file: compare how many tensors the optimiser held
        n_saved = _optimizer_param_count(state.get("optimizer_state_dict"))
        if n_saved is None or n_saved == len(current):
            return []
        return [f"trainable set changed ({n_saved} -> {len(current)} tensors)"]
    added, removed = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if not added and not removed:
        return []
    parts = []
    if added:
        parts.append(f"{_modules(added)} unfrozen: +{len(added)} tensors")
    if removed:
        parts.append(f"{_modules(removed)} frozen: -{len(removed)} tensors")
    return [f"trainable set changed ({', '.join(parts)})"]


def _modules(names: Sequence[str]) -> str:
    return "/".join(sorted({n.split(".", 1)[0] for n in names}))


def _optimizer_param_count(opt_state: Any) -> int | None:
    try:
        return sum(len(g["params"]) for g in opt_state["param_groups"])
    except (TypeError, KeyError):
        return None


def _hparam_changes(state: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """lr / weight_decay differences: a restored optimiser would silently keep the old values."""
    saved_optim = (state.get("config") or {}).get("optim") or state.get("args") or {}
    changes = []
    for key, new in (("lr", cfg.optim.lr), ("weight_decay", cfg.optim.weight_decay)):
        old = saved_optim.get(key)
        if old is not None and not _close(float(old), float(new)):
            changes.append(f"{key} {float(old):g} -> {new:g}")
    return changes


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 + 1e-9 * max(abs(a), abs(b))


@dataclass
class RunState:
    """What carries across epochs and into checkpoints: the epoch the loop starts at and the
    best metrics and histories it extends.

    Defined here rather than in the worker so that the one resume path (:func:`restore_weights`
    then :func:`restore_training_state`) is Ray-free and the exact-continuation test runs the
    code production runs.
    """

    start_epoch: int = FRESH_START_EPOCH
    best_val_loss: float = float("inf")
    best_val_psnr: float = float("-inf")
    train_history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)

    def record_epoch(
        self, epoch: int, train: Mapping[str, float], val: Mapping[str, float], best_metric: str
    ) -> bool:
        """Append the epoch to the histories and update the bests; returns whether the epoch is
        the best so far by ``best_metric`` (:func:`run_files.improves`): its state becomes
        ``best_model.pth``. Both bests are kept whatever the metric (the files store both);
        the best face PSNR is read off the history, which the files hold (checkpoints written
        before ``psnr_face`` existed have none in it, so a resumed run's first epoch is best)."""
        best = {
            "loss": self.best_val_loss,
            "psnr": self.best_val_psnr,
            "psnr_face": max(
                (float(h["psnr_face"]) for h in self.val_history if "psnr_face" in h),
                default=float("-inf"),
            ),
        }
        self.train_history.append({"epoch": epoch, **train})
        self.val_history.append({"epoch": epoch, **val})
        is_best = run_files.improves(best_metric, val, best)
        self.best_val_loss = min(self.best_val_loss, val["loss"])
        self.best_val_psnr = max(self.best_val_psnr, val["psnr"])
        return is_best

    @classmethod
    def continued_from(cls, state: Mapping[str, Any], start_epoch: int) -> RunState:
        """The run ``state`` was saved from, continuing at ``start_epoch`` (history adopted)."""
        return cls(
            start_epoch=start_epoch,
            best_val_loss=float(state.get("best_val_loss", float("inf"))),
            best_val_psnr=float(state.get("best_val_psnr", float("-inf"))),
            train_history=list(state.get("train_metrics_history", [])),
            val_history=list(state.get("val_metrics_history", [])),
        )


@dataclass(frozen=True)
class StartingPoint:
    """What :func:`restore_weights` decided about a starting checkpoint.

    ``continuing``: the run goes on where the file stopped, so the caller must follow with
    :func:`restore_training_state` (and pass its discriminator optimizer to
    :func:`restore_discriminator`); False is a warm start (weights only, fresh optimizer,
    schedule, history). ``message`` is the line that tells the user which it was and why.
    """

    run: RunState
    continuing: bool
    message: str


def restore_weights(
    state: Mapping[str, Any],
    model: nn.Module,
    signature: Mapping[str, Any],
    cfg: TrainConfig,
    trainable: Sequence[str],
    ray_checkpoint: str | None = None,
) -> StartingPoint:
    """First half of the one resume path: check ``state`` fits ``model``, load its weights, and
    decide whether the run continues or warm-starts.

    Split from :func:`restore_training_state` because the worker must load weights before DDP
    wraps the model, and builds the optimizer, scheduler and engine only after.
    ``ray_checkpoint`` is the folder of this run's own Ray checkpoint (a driver restart or worker
    failure: always continues, flags were already checked by ``plan_rerun``); None for
    ``--resume``, which continues or warm-starts as :func:`plan_resume` decides.
    """
    check_model_compat(state, model, signature)
    unwrap_model(model).load_state_dict(state["model_state_dict"])
    if ray_checkpoint:
        run = RunState.continued_from(state, int(state["epoch"]) + 1)
        message = (
            f"resumed from Ray checkpoint {ray_checkpoint} at epoch {state['epoch']}"
            f" (continuing at epoch {run.start_epoch})"
        )
        return StartingPoint(run, True, message)
    plan = plan_resume(state, cfg, trainable)
    message = f"--resume {cfg.output.resume}: {plan.reason}"
    if plan.restore_optimizer:
        return StartingPoint(RunState.continued_from(state, plan.start_epoch), True, message)
    return StartingPoint(RunState(start_epoch=plan.start_epoch), False, message)


class _Loadable(Protocol):
    """Anything with ``load_state_dict`` (the engine: this package cannot import it, the
    engine imports this package)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


def restore_training_state(
    state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    engine: _Loadable | None,
    *,
    rank: int,
    seed: int,
    start_epoch: int,
) -> None:
    """Second half of the one resume path, for a continuing run (``StartingPoint.continuing``):
    optimizer, scheduler, the engine's state (scaler, counters) and this rank's RNG streams.

    Each rank continues its own streams (:func:`rng_state_for_rank`); a rank the file saved
    none for (it was written by fewer workers, or by the original script) gets a stream derived
    from (seed, rank, start_epoch) rather than a repeat of the one it started the run with.
    """
    optimizer.load_state_dict(state["optimizer_state_dict"])
    scheduler.load_state_dict(state["scheduler_state_dict"])
    if engine is not None and state.get("engine_state"):
        engine.load_state_dict(state["engine_state"])
    mine = rng_state_for_rank(state, rank)
    if mine:
        restore_rng_state(mine)
    else:
        seed_rank_streams(seed, rank, start_epoch)


def restore_discriminator(
    state: Mapping[str, Any],
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> str:
    """Load the discriminator's weights (and ``optimizer``'s state when given and saved) from
    ``state``; returns the line saying what happened.

    Mirrors the generator: weights whenever the file has them, the optimiser only when the
    caller continues the run (passes ``optimizer``).  A file without a discriminator (an older
    checkpoint, or a run without the option) leaves the fresh one: the option can be switched
    on for a new stage.  A discriminator that does not fit raises CheckpointError naming it.
    """
    source = _source(state)
    saved = state.get(DISC_KEY)
    if not saved:
        return f"{source} holds no discriminator: a fresh one starts"
    current = unwrap_model(discriminator).state_dict()
    problems = _state_dict_diffs(saved, current)
    if problems:
        raise CheckpointError(
            f"{source}: its discriminator does not fit this run's: " + "; ".join(problems)
        )
    unwrap_model(discriminator).load_state_dict(saved)
    if optimizer is None:
        return f"discriminator weights loaded from {source}, fresh discriminator optimizer"
    if not state.get(DISC_OPTIMIZER_KEY):
        return f"discriminator weights loaded from {source} (it holds no discriminator optimizer)"
    optimizer.load_state_dict(state[DISC_OPTIMIZER_KEY])
    return f"discriminator and its optimizer resumed from {source}"
