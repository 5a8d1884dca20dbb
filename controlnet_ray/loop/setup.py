"""One worker's setup, top to bottom: seeds, rank 0's outputs, the components
(:func:`build_trainee`: model, starting checkpoint through the one resume path, optimizer,
scheduler, adversary, engine), the judges, then :class:`~controlnet_ray.loop.epochs.TrainingLoop`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from controlnet_ray import checkpoint as ckpt
from controlnet_ray import run_files
from controlnet_ray.config import TrainConfig
from controlnet_ray.engine import (
    Adversary,
    AmpSettings,
    TrainEngine,
    build_disc_optimizer,
    build_optimizer,
    build_scheduler,
    resolve_amp,
)
from controlnet_ray.loop.collectives import from_rank_zero
from controlnet_ray.loop.epochs import TrainingLoop
from controlnet_ray.loop.host import WorkerHost, WorkerSetup
from controlnet_ray.loop.validation import build_judging
from controlnet_ray.model import apply_freezing, build_model, model_signature
from controlnet_ray.model.discriminator import build_discriminator
from controlnet_ray.outputs import RankZeroOutputs
from controlnet_ray.progress import WorkerProgress
from controlnet_ray.storage import RunStorage


def run_worker(setup: WorkerSetup, host: WorkerHost) -> None:
    """One worker's whole run: what ``train_loop_per_worker`` does once it has Ray's context."""
    cfg = setup.cfg
    progress = WorkerProgress(setup.progress_board, host.rank)
    torch.manual_seed(cfg.ray.seed + host.rank)
    torch.set_num_threads(max(1, setup.torch_threads))
    batches_per_epoch = batches_per_rank(setup.num_train_pairs, cfg.data.batch_size, host.world)
    outputs = open_outputs(cfg, setup.scratch_root) if host.rank == 0 else None
    amp = resolve_amp(cfg.optim.use_amp, host.device)
    trainee = build_trainee(cfg, host, amp, batches_per_epoch, progress)
    progress.message(
        f"rank 0 of {host.world}: pid {os.getpid()}, device {host.device}, "
        f"{batches_per_epoch} batches/epoch; {amp.description}"
    )
    judging = build_judging(cfg, host.rank, setup.shards_dir)
    TrainingLoop(cfg, host, trainee, outputs, judging, progress, setup.pose_estimate).run()


def batches_per_rank(num_train_pairs: int, batch_size: int, world: int) -> int:
    """Training batches each rank takes per epoch (equal on every rank, so DDP stays in step)."""
    per_rank = num_train_pairs // (batch_size * world)
    if per_rank < 1:
        raise ValueError(
            f"{num_train_pairs} training pairs are fewer than one batch per worker "
            f"(batch_size {batch_size} x {world} workers): lower --batch_size"
        )
    return per_rank


def open_outputs(cfg: TrainConfig, scratch_root: Path) -> RankZeroOutputs:
    """Rank 0's scratch folder (on its own node's disk, never the driver's --save_dir, which
    other nodes may not have) and the run storage it publishes to."""
    storage = RunStorage.open(cfg.storage_path(), cfg.run_name())
    return RankZeroOutputs(storage, Path(scratch_root) / cfg.run_name())


@dataclass
class Trainee:
    """The typed components one worker trains, built by :func:`build_trainee`."""

    model: nn.Module  # as the host prepared it (DDP across workers)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    engine: TrainEngine
    adversary: Adversary | None
    signature: dict[str, Any]
    trainable: list[str]
    batches_per_epoch: int
    run: ckpt.RunState  # the epoch to start at, the bests and histories to extend
    ray_state_path: str | None = None  # the starting Ray checkpoint's state file in storage


def build_trainee(
    cfg: TrainConfig,
    host: WorkerHost,
    amp: AmpSettings,
    batches_per_epoch: int,
    progress: WorkerProgress,
) -> Trainee:
    """Model, starting checkpoint, optimizer, scheduler, adversary and engine, in the order the
    one resume path needs: weights before DDP wraps the model (``checkpoint.restore_weights``),
    optimizer, scheduler and RNG once they exist (``checkpoint.restore_training_state``)."""
    model = build_model(cfg.model)
    apply_freezing(model, cfg.model)
    signature = model_signature(cfg.model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    ray_path, state = from_rank_zero(
        host.starting_checkpoint() if host.rank == 0 else (None, None), host.device
    )
    start = None
    if state is not None:
        start = ckpt.restore_weights(state, model, signature, cfg, trainable, ray_path or None)
        progress.message(start.message)
    continuing = start is not None and start.continuing
    model = host.prepare_model(model)
    if cfg.optim.compile:  # around DDP, as torch recommends; unwrap_model sees through both
        model = torch.compile(model)
    optimizer = build_optimizer(ckpt.unwrap_model(model), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, batches_per_epoch)
    adversary = _build_adversary(cfg, host, amp, state, continuing, progress)
    engine = TrainEngine(
        model, optimizer, scheduler, cfg.optim, host.device, amp, adversary=adversary
    )
    run = start.run if start is not None else ckpt.RunState()
    if continuing:
        ckpt.restore_training_state(
            state,
            optimizer,
            scheduler,
            engine,
            rank=host.rank,
            seed=cfg.ray.seed,
            start_epoch=run.start_epoch,
        )
    ray_state = f"{ray_path}/{run_files.RAY_STATE_FILE}" if ray_path else None
    return Trainee(
        model, optimizer, scheduler, engine, adversary, signature, trainable,
        batches_per_epoch, run, ray_state,
    )  # fmt: skip


def _build_adversary(
    cfg: TrainConfig,
    host: WorkerHost,
    amp: AmpSettings,
    state: dict | None,
    continuing: bool,
    progress: WorkerProgress,
) -> Adversary | None:
    """The discriminator of ``--adversarial_loss_weight`` (None when 0), wrapped and restored
    like the model: weights from the starting checkpoint whenever it has them, its optimizer
    too when the run continues (the generator's optimizer is restored)."""
    if cfg.optim.adversarial_loss_weight <= 0:
        return None
    disc = host.prepare_model(build_discriminator(cfg.model))
    optimizer = build_disc_optimizer(ckpt.unwrap_model(disc), cfg.optim)
    if state is not None:
        line = ckpt.restore_discriminator(state, disc, optimizer if continuing else None)
        progress.message(line)
    return Adversary(disc, optimizer, host.device, amp)
