"""The epochs of one worker (:class:`TrainingLoop`): the training pass with its sums and
progress, the validation call, rank 0's TensorBoard summaries, the checkpoint and the report.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from controlnet_ray import checkpoint as ckpt
from controlnet_ray import run_files
from controlnet_ray.config import TrainConfig
from controlnet_ray.data.batch import to_model_batch
from controlnet_ray.data.prefetch import FirstItemPrefetch
from controlnet_ray.engine import EvalSums, NonFiniteLossError, StepMetrics
from controlnet_ray.loop.collectives import all_reduce_sum, all_rng_states
from controlnet_ray.loop.epoch_metrics import _require_finite, epoch_metrics
from controlnet_ray.loop.host import EpochCheckpoint, WorkerHost
from controlnet_ray.loop.validation import judge, validate
from controlnet_ray.metrics import face_mask
from controlnet_ray.outputs import RankZeroOutputs
from controlnet_ray.progress import WorkerProgress
from controlnet_ray.reporting import TensorBoardReporter

if TYPE_CHECKING:  # setup builds the Trainee and imports this module
    from controlnet_ray.loop.setup import Trainee


STEP_LOG_EVERY = 10


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
        pose_estimate: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.host, self.t = cfg, host, trainee
        self.pose_estimate = pose_estimate  # saved in every checkpoint, for generate
        self.rank, self.world = host.rank, host.world
        self.engine, self.model = trainee.engine, trainee.model
        self.run_state = trainee.run
        self.batches_per_epoch = trainee.batches_per_epoch
        self.outputs, self.judging, self.progress = outputs, judging, progress
        self.face_region = face_mask(cfg.data.image_size, cfg.data.framing)

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
                val_sums = validate(
                    self.model, self.host, cfg.optim, self.engine.amp, self.face_region
                )
                val_metrics = _require_finite(val_sums.means(), f"epoch {epoch}: validation")
                val_metrics.update(judge(self.judging, self.model, self.host.device))
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
        sums = all_reduce_sum(sums)
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

    # -- validation and its summaries -------------------------------------------------------
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
            pose_estimate=self.pose_estimate,
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
        first = self.run_state.start_epoch
        return epoch_metrics(epoch, self.cfg.optim.epochs, first, train, val, elapsed)
