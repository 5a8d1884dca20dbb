"""One worker's training run, without Ray: build the components, then run the epochs.

Why a module of its own: the loop (steps, epoch sums, the validation reduce, the best model,
TensorBoard, the original's files, the report) is the product, and it must run in a test
process. Everything it needs from Ray Train (this worker's rank and device, DDP preparation,
the dataset shards, the starting checkpoint, ``report``) comes through a :class:`WorkerHost`:
:class:`controlnet_ray.worker.RayHost` in production, an in-process host in
``tests/test_loop.py``. Collectives go through ``torch.distributed`` (no-ops without a
process group), so one process is a world of one.

Setup reads top to bottom in :func:`run_worker`: seeds, rank 0's outputs, the components
(:func:`build_trainee`: model, starting checkpoint through the one resume path, optimizer,
scheduler, adversary, engine), the judges, then :class:`TrainingLoop`.

Nothing here imports ray.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from controlnet_ray import checkpoint as ckpt
from controlnet_ray import run_files
from controlnet_ray.config import TrainConfig
from controlnet_ray.data.batch import to_model_batch
from controlnet_ray.data.prefetch import FirstItemPrefetch
from controlnet_ray.engine import (
    Adversary,
    AmpSettings,
    EvalSums,
    NonFiniteLossError,
    StepMetrics,
    TrainEngine,
    build_disc_optimizer,
    build_optimizer,
    build_scheduler,
    evaluate,
    resolve_amp,
)
from controlnet_ray.model import apply_freezing, build_model, model_signature
from controlnet_ray.model.discriminator import build_discriminator
from controlnet_ray.outputs import EpochFiles, RankZeroOutputs
from controlnet_ray.progress import WorkerProgress
from controlnet_ray.reporting import TensorBoardReporter
from controlnet_ray.storage import RunStorage

STEP_LOG_EVERY = 10
SCRATCH_ROOT = "controlnet_ray_rank0"  # under the node's temp folder: rank 0's local files
JUDGED_MAX_PAIRS = 256  # validation pairs the judges score each epoch (an even subset)
JUDGED_KEYS = (
    "judged_yaw_err_deg",
    "judged_pitch_err_deg",
    "judge_floor_yaw_deg",
    "judge_floor_pitch_deg",
    "face_margin_db",
    "id_top1",
    "id_chance",
    "sharpness",
)


# --------------------------------------------------------------------------- the host


@dataclass(frozen=True)
class EpochCheckpoint:
    """Rank 0's saved epoch, handed to :meth:`WorkerHost.report`. ``publish`` copies it into the
    run storage (with the original's files) and returns its folder there; Ray calls it on its
    upload thread, an in-process host calls it at once."""

    files: EpochFiles
    outputs: RankZeroOutputs

    @property
    def local_dir(self) -> Path:
        """The folder holding ``run_files.RAY_STATE_FILE`` on rank 0's disk."""
        return self.files.checkpoint_dir

    def publish(self, checkpoint_dir_name: str) -> str:
        return self.outputs.publish(self.files, checkpoint_dir_name)


class WorkerHost(Protocol):
    """What the loop needs from the process it runs in (Ray Train's context in production)."""

    rank: int
    world: int
    device: torch.device

    def prepare_model(self, module: nn.Module) -> nn.Module:
        """``module`` on this worker's device, wrapped for data parallelism across workers."""
        ...

    def starting_checkpoint(self) -> tuple[str | None, dict | None]:
        """Asked on rank 0 only: (this run's checkpoint folder, its state) to continue from; or
        ("", state) for a ``--resume`` file; or (None, None) to start fresh."""
        ...

    def batches(self, train: bool) -> Iterable[dict[str, torch.Tensor]]:
        """One pass over this worker's training (or validation) shard, on its device, as the
        pipeline delivers it: uint8 ``[B, H, W, 3]`` images, float32 poses (the loop turns
        them into the engine's batch with ``data.batch.to_model_batch``)."""
        ...

    def report(self, metrics: dict[str, Any], saved: EpochCheckpoint | None) -> None:
        """Hand an epoch's metrics (and, on rank 0, its checkpoint) to whoever drives the run."""
        ...


@dataclass(frozen=True)
class WorkerSetup:
    """What the driver gives every worker besides Ray's context (``loop_config``, typed)."""

    cfg: TrainConfig
    num_train_pairs: int
    torch_threads: int = 1
    shards_dir: str | None = None  # the judges' data; None: no judging
    progress_board: Any = None  # the driver's console actor; None prints lines here
    scratch_root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / SCRATCH_ROOT)


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
    TrainingLoop(cfg, host, trainee, outputs, judging, progress).run()


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


# --------------------------------------------------------------------------- collectives


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def from_rank_zero(obj: Any, device: torch.device | None = None) -> Any:
    """Rank 0's ``obj`` on every rank: a starting checkpoint is read once (by rank 0, from
    wherever it lives) and sent over the process group, not read by every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG streams, by rank (a collective: every rank calls it)."""
    mine = ckpt.capture_rng_state()
    if not _distributed():
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


# --------------------------------------------------------------------------- components


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


def build_judging(cfg: TrainConfig, rank: int, shards_dir: str | None) -> Any:
    """Rank 0's independent judges of the val persons (``controlnet_ray.judging``; the
    judge itself was trained by the driver before Ray started), or None when off."""
    if rank != 0 or cfg.output.no_judge or not shards_dir:
        return None
    from controlnet_ray.judging import prepare_judging

    return prepare_judging(
        shards_dir,
        cfg.data.resolved_cache_dir(),
        held_splits=("val",),
        max_pairs=JUDGED_MAX_PAIRS,
        verbose=False,
    )


# --------------------------------------------------------------------------- the loop


class TrainingLoop:
    """The epochs of one worker; methods are the steps of an epoch, in order."""

    def __init__(
        self,
        cfg: TrainConfig,
        host: WorkerHost,
        trainee: Trainee,
        outputs: RankZeroOutputs | None,
        judging: Any,
        progress: WorkerProgress,
    ) -> None:
        self.cfg, self.host, self.t = cfg, host, trainee
        self.rank, self.world = host.rank, host.world
        self.engine, self.model = trainee.engine, trainee.model
        self.run_state = trainee.run
        self.batches_per_epoch = trainee.batches_per_epoch
        self.outputs, self.judging, self.progress = outputs, judging, progress

    def run(self) -> None:
        cfg, first = self.cfg, self.run_state.start_epoch
        if first > cfg.optim.epochs:
            self._report_finished_run()
            return
        log_dir = self.outputs.log_dir if self.outputs is not None else cfg.output.log_dir
        reporter = TensorBoardReporter(log_dir, enabled=self.rank == 0)
        t_start = time.time()
        next_batches = self._prefetched_train_batches()
        with reporter:
            for epoch in range(first, cfg.optim.epochs + 1):
                t0 = time.time()
                train_metrics = self._train_epoch(epoch, next_batches, reporter)
                train_time = time.time() - t0
                if epoch < cfg.optim.epochs:  # the next epoch's data starts during validation
                    next_batches = self._prefetched_train_batches()
                val_sums = self._validate()
                val_metrics = _require_finite(val_sums.means(), f"epoch {epoch}: validation")
                val_metrics.update(self._judged())
                # Throughput over the training pass only (as benchmarks measure it); the
                # epoch time includes validation.
                train_metrics["samples_per_sec"] = train_metrics.pop("samples") / train_time
                train_metrics["epoch_time_s"] = time.time() - t0
                is_best = self.run_state.record_epoch(
                    epoch, train_metrics, val_metrics, cfg.output.best_metric
                )
                self._log_epoch(epoch, train_metrics, val_metrics, val_sums, reporter)
                self._save_and_report(
                    epoch, train_metrics, val_metrics, is_best, time.time() - t_start
                )

    def _prefetched_train_batches(self) -> FirstItemPrefetch:
        return FirstItemPrefetch(lambda: self.host.batches(train=True))

    # -- training ----------------------------------------------------------------------------
    def _train_epoch(
        self, epoch: int, batches: Iterable[dict], reporter: TensorBoardReporter | None
    ) -> dict[str, float]:
        self.model.train()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, image, pose, samples
        n_batches = self.batches_per_epoch
        steps_before, skipped_before = self.engine.optimizer_steps, self.engine.skipped_steps
        t0 = time.time()
        for i, raw in enumerate(batches):
            if i >= n_batches:  # equal batch counts on every rank keep DDP in step
                break
            # Normalised and mirrored on the device, in this thread (not the prefetch
            # thread's): the mirrors draw from this rank's seeded, checkpointed RNG.
            batch = to_model_batch(raw, flip=True)
            m = self.engine.train_micro_batch(batch, is_last_in_epoch=i == n_batches - 1)
            if not m.skipped:
                self._account(m, sums, reporter)
            self._post_step(epoch, i + 1, sums, t0)
        if self.engine.optimizer_steps == steps_before:
            self._fail_untrained_epoch(epoch, self.engine.skipped_steps - skipped_before)
        sums = _all_reduce_sum(sums)
        n = sums[3].item()
        return {
            "loss": sums[0].item() / n,
            "image_loss": sums[1].item() / n,
            "pose_loss": sums[2].item() / n,
            "samples": sums[3].item(),
        }

    def _fail_untrained_epoch(self, epoch: int, skipped: int) -> None:
        """An epoch without one successful optimizer step trained nothing: recording it (as loss
        0.0, the mean of no samples) and saving the unchanged weights would pass an untrained
        model off as trained. The skip decisions are all-reduced, so every rank raises here."""
        o = self.cfg.optim
        raise NonFiniteLossError(
            f"epoch {epoch}: no optimizer step succeeded ({skipped} of {self.batches_per_epoch} "
            "micro-batches had a non-finite loss, the rest non-finite gradients); nothing of "
            f"this epoch is recorded or saved. Check --lr {o.lr:g}, --pose_loss_weight "
            f"{o.pose_loss_weight:g}, --identity_loss_weight {o.identity_loss_weight:g}, "
            f"--weight_decay {o.weight_decay:g} and the data"
        )

    def _account(
        self, m: StepMetrics, sums: torch.Tensor, reporter: TensorBoardReporter | None
    ) -> None:
        """Add one micro-batch to the epoch sums; rank 0 logs every STEP_LOG_EVERY steps."""
        n = m.batch_size
        sums += torch.tensor(
            [m.loss * n, m.image_loss * n, m.pose_loss * n, n], dtype=torch.float64
        )
        if (
            self.rank == 0
            and m.optimizer_step
            and self.engine.optimizer_steps % STEP_LOG_EVERY == 0
        ):
            scalars = {
                "Loss": m.loss,
                "ImageLoss": m.image_loss,
                "PoseLoss": m.pose_loss,
                "LearningRate": m.lr,
            }
            if self.engine.adversary is not None:
                scalars |= {"AdvLoss": m.adv_loss, "DiscLoss": m.disc_loss}
            reporter.log_step(self.engine.optimizer_steps, scalars)

    def _post_step(self, epoch: int, step: int, sums: torch.Tensor, t0: float) -> None:
        """Rank 0's in-epoch state for the driver's progress bar (local, unreduced figures)."""
        if not self.progress.due(last=step == self.batches_per_epoch):
            return
        elapsed = time.time() - t0
        samples = sums[3].item() * self.world
        self.progress.step(
            {
                "epoch": epoch,
                "epochs": self.cfg.optim.epochs,
                "phase": "train",
                "step": step,
                "total": self.batches_per_epoch,
                "loss": sums[0].item() / max(sums[3].item(), 1.0),
                "samples_per_sec": samples / max(elapsed, 1e-9),
                "elapsed_s": elapsed,
            }
        )

    # -- validation --------------------------------------------------------------------------
    def _validate(self) -> EvalSums:
        sums = evaluate(
            ckpt.unwrap_model(self.model),
            (to_model_batch(b) for b in self.host.batches(train=False)),
            self.cfg.optim,
            self.host.device,
            self.engine.amp,
            keep_sample=self.rank == 0,
        )
        reduced = EvalSums.from_tensor(_all_reduce_sum(sums.to_tensor()))
        reduced.sample = sums.sample
        return reduced

    def _judged(self) -> dict[str, Any]:
        """This epoch's judged headline figures (rank 0; empty elsewhere or when off)."""
        if self.judging is None:
            return {}
        model = ckpt.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            report = self.judging.report(model.generate, self.host.device)
        finally:
            model.train(was_training)
        return judged_metrics(report)

    def _log_epoch(
        self, epoch: int, train: dict, val: dict, val_sums: EvalSums, reporter: TensorBoardReporter
    ) -> None:
        """Rank 0's TensorBoard summaries of the epoch (images every --image_log_interval)."""
        if self.rank != 0:
            return
        reporter.log_epoch(epoch, train, val, train["samples_per_sec"])
        sample = val_sums.sample
        if sample is not None and (epoch % self.cfg.output.image_log_interval == 0 or epoch == 1):
            reporter.log_images(epoch, sample["source"], sample["target"], sample["output"])
            reporter.log_pose_histograms(epoch, sample["source_pose"], sample["target_pose"])
        reporter.flush()

    # -- checkpoints and the report ----------------------------------------------------------
    def _save_and_report(
        self, epoch: int, train: dict, val: dict, is_best: bool, elapsed: float
    ) -> None:
        """Every rank's RNG streams go into the checkpoint; rank 0 serialises the state once
        and writes the epoch's small files, and the host publishes them (Ray: on its upload
        thread, so the other ranks wait at ``report`` for one ``torch.save`` only)."""
        metrics = self._epoch_metrics(epoch, train, val, elapsed)
        rng_states = all_rng_states()
        if self.outputs is None:
            self.host.report(metrics, None)
            return
        o = self.cfg.output
        names = run_files.epoch_names(epoch, self.cfg.optim.epochs, o.save_interval, is_best)
        s = self.run_state
        files = self.outputs.write_epoch(
            epoch, self._state_dict(epoch, rng_states), names, s.train_history, s.val_history
        )
        self.host.report(metrics, EpochCheckpoint(files, self.outputs))

    def _state_dict(self, epoch: int, rank_rng_states: list[dict]) -> dict:
        s, t = self.run_state, self.t
        return ckpt.build_checkpoint(
            epoch=epoch,
            model=ckpt.unwrap_model(self.model),
            optimizer=t.optimizer,
            scheduler=t.scheduler,
            engine_state=self.engine.state_dict(),
            cfg=self.cfg,
            best_val_loss=s.best_val_loss,
            best_val_psnr=s.best_val_psnr,
            train_history=s.train_history,
            val_history=s.val_history,
            rng_state=rank_rng_states[0],
            rank_rng_states=rank_rng_states,
            model_signature=t.signature,
            trainable=t.trainable,
            discriminator=t.adversary and t.adversary.discriminator,
            discriminator_optimizer=t.adversary and t.adversary.optimizer,
        )

    def _report_finished_run(self) -> None:
        """The starting checkpoint is the last epoch (e.g. a driver or Tune restarted after it):
        say so, report that epoch's metrics again for whoever waits on a result (Tune), and
        publish the final files again from the stored state in case an older run stopped
        before."""
        s, epoch = self.run_state, self.run_state.start_epoch - 1
        self.progress.message(f"nothing to train: the run already reached epoch {epoch}")
        if not (s.train_history and s.val_history):
            return
        metrics = self._epoch_metrics(epoch, s.train_history[-1], s.val_history[-1], 0.0)
        self.host.report(metrics, None)
        if self.outputs is not None and self.t.ray_state_path:
            self.outputs.publish_final(self.t.ray_state_path, s.train_history, s.val_history)

    def _epoch_metrics(self, epoch: int, train: dict, val: dict, elapsed: float) -> dict:
        """What each epoch reports (and what the console line shows); never a NaN score (Ray's
        checkpoint ranking and Tune's schedulers break on one)."""
        metrics = {
            "epoch": epoch,
            "epochs": self.cfg.optim.epochs,
            "first_epoch": self.run_state.start_epoch,
            "train_loss": train["loss"],
            "train_image_loss": train["image_loss"],
            "train_pose_loss": train["pose_loss"],
            "val_loss": val["loss"],
            "val_psnr": val["psnr"],
            "val_ssim": val["ssim"],
            "val_pose_mae_deg": val["pose_mae_deg"],
            "samples_per_sec": train["samples_per_sec"],
            "epoch_time_s": train["epoch_time_s"],
            "elapsed_s": elapsed,
            **{k: v for k, v in val.items() if k in JUDGED_KEYS},
        }
        return _require_finite(metrics, f"epoch {epoch}")


def judged_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The headline of a judged report as flat epoch metrics (strict JSON: no None/NaN)."""
    model, floor, head = report["rows"]["model"], report["rows"]["floor"], report["headline"]
    out = {
        "judged_yaw_err_deg": model["pose_err_median_deg"]["yaw"],
        "judged_pitch_err_deg": model["pose_err_median_deg"]["pitch"],
        "judge_floor_yaw_deg": floor["pose_err_median_deg"]["yaw"],
        "judge_floor_pitch_deg": floor["pose_err_median_deg"]["pitch"],
        "face_margin_db": head["face_psnr_margin_db"],
        "id_top1": head["id_top1"],
        "id_chance": report["chance_id_top1"],
        "sharpness": head["sharpness"],
    }
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _require_finite(metrics: dict[str, float], what: str) -> dict[str, float]:
    """``metrics`` unchanged when every value is finite, else NonFiniteLossError naming them."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        shown = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise NonFiniteLossError(
            f"{what} gave non-finite metrics ({shown}): the model diverged; nothing of this "
            "epoch is recorded or saved. Lower --lr or check the loss weights and the data."
        )
    return metrics
