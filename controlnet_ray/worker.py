"""``train_loop_per_worker``: the only module that touches ``ray.train``'s context.

Everything numeric lives in :mod:`controlnet_ray.engine` (pure PyTorch); this module wires it
to Ray: dataset shards, DDP preparation, metric reduction across ranks, Ray checkpoints, and the
original's files (written by rank 0 only, published to the run's storage: see
:mod:`controlnet_ray.outputs`).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from controlnet_ray import checkpoint as ckpt
from controlnet_ray.config import TrainConfig
from controlnet_ray.data.prefetch import FirstItemPrefetch
from controlnet_ray.engine import (
    Adversary,
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
from controlnet_ray.outputs import EpochFiles, RankZeroOutputs, epoch_names
from controlnet_ray.progress import WorkerProgress
from controlnet_ray.reporting import TensorBoardReporter
from controlnet_ray.storage import RunStorage

RAY_CKPT_FILE = ckpt.RAY_STATE_FILE
STEP_LOG_EVERY = 10
SCRATCH_ROOT = "controlnet_ray_rank0"  # under the node's temp folder: rank 0's local files


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


def scratch_dir(run_name: str) -> Path:
    """Rank 0's local folder for this run (emptied by RankZeroOutputs): on its own node's
    disk, never the driver's --save_dir, which other nodes may not have."""
    return Path(tempfile.gettempdir()) / SCRATCH_ROOT / run_name


class WorkerRun:
    """One worker's training run; methods are the steps of the loop, in order."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        self.cfg = TrainConfig.from_dict(loop_config["config"])
        self.num_train_pairs = int(loop_config["num_train_pairs"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.progress = WorkerProgress(loop_config.get("progress_board"), self.rank)
        torch.manual_seed(self.cfg.ray.seed + self.rank)
        threads = int(loop_config.get("torch_threads", 1))
        torch.set_num_threads(max(1, threads))
        self.device = ray.train.torch.get_device()
        self.amp = resolve_amp(self.cfg.optim.use_amp, self.device)
        self.outputs = self._rank_zero_outputs() if self.rank == 0 else None
        self.state = ckpt.RunState()
        self._resume_ref = loop_config.get("resume_state")  # --resume, read by the driver
        self._initial_state: dict | None = None  # the checkpoint the run starts from, if any
        self._ray_state_path: str | None = None  # its state file in storage, when Ray's
        self._build()
        self.judging = self._build_judging(loop_config.get("shards_dir"))

    # -- setup -------------------------------------------------------------------------------
    def _rank_zero_outputs(self) -> RankZeroOutputs:
        storage = RunStorage.open(self.cfg.storage_path(), self.cfg.run_name())
        return RankZeroOutputs(storage, scratch_dir(self.cfg.run_name()))

    def _build(self) -> None:
        cfg = self.cfg
        model = build_model(cfg.model)
        apply_freezing(model, cfg.model)
        self.signature = model_signature(cfg.model)
        self.trainable_names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        restored = self._load_initial_state(model)
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = build_optimizer(ckpt.unwrap_model(self.model), cfg.optim)
        per_rank = self.num_train_pairs // (cfg.data.batch_size * self.world)
        if per_rank < 1:
            raise ValueError(
                f"{self.num_train_pairs} training pairs are fewer than one batch per worker "
                f"(batch_size {cfg.data.batch_size} x {self.world} workers): lower --batch_size"
            )
        self.batches_per_epoch = per_rank
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, per_rank)
        self.adversary = self._build_adversary(continuing=restored is not None)
        self.engine = TrainEngine(
            self.model,
            self.optimizer,
            self.scheduler,
            cfg.optim,
            self.device,
            self.amp,
            adversary=self.adversary,
        )
        if restored is not None:
            self._restore_optimizer(restored)
        self._initial_state = None  # its tensors are in the modules now
        self.progress.message(
            f"rank 0 of {self.world}: pid {os.getpid()}, device {self.device}, "
            f"{self.batches_per_epoch} batches/epoch; {self.amp.description}"
        )

    def _build_judging(self, shards_dir: str | None) -> Any:
        """Rank 0's independent judges of the val persons (``controlnet_ray.judging``; the
        judge itself was trained by the driver before Ray started), or None when off."""
        if self.rank != 0 or self.cfg.output.no_judge or not shards_dir:
            return None
        from controlnet_ray.judging import prepare_judging

        return prepare_judging(
            shards_dir,
            self.cfg.data.resolved_cache_dir(),
            held_splits=("val",),
            max_pairs=JUDGED_MAX_PAIRS,
            verbose=False,
        )

    def _judged(self) -> dict[str, Any]:
        """This epoch's judged headline figures (rank 0; empty elsewhere or when off)."""
        if self.judging is None:
            return {}
        model = ckpt.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            report = self.judging.report(model.generate, self.device)
        finally:
            model.train(was_training)
        return judged_metrics(report)

    def _read_initial_state(self) -> tuple[str | None, dict | None]:
        """Rank 0 gets the starting checkpoint and every rank receives it from rank 0: this
        run's Ray checkpoint first (driver restart, worker failure), read from storage, then
        --resume, which the driver read and put in the object store; (None, None) without.
        The first element is the Ray checkpoint's folder in storage, or "" for --resume."""
        ray_ckpt = ray.train.get_checkpoint()
        found: tuple[str | None, dict | None] = (None, None)
        if self.rank == 0 and ray_ckpt is not None:
            with ray_ckpt.as_directory() as d:
                found = (ray_ckpt.path, ckpt.load_checkpoint(Path(d) / RAY_CKPT_FILE))
        elif self.rank == 0 and self._resume_ref is not None:
            found = ("", ray.get(self._resume_ref))
        return from_rank_zero(found, self.device)

    def _load_initial_state(self, model: torch.nn.Module) -> dict | None:
        """Apply the starting checkpoint's weights through ``checkpoint.restore_weights`` (the
        one resume path, Ray-free so tests run it): a Ray checkpoint continues the run;
        --resume continues or warm-starts as ``plan_resume`` decides. Returns the state when
        the run continues (its optimizer, scheduler and RNG follow once they are built)."""
        ray_path, state = self._read_initial_state()
        if state is None:
            return None
        self._initial_state = state
        if ray_path:
            self._ray_state_path = f"{ray_path}/{RAY_CKPT_FILE}"
        start = ckpt.restore_weights(
            state, model, self.signature, self.cfg, self.trainable_names, ray_path or None
        )
        self.state = start.run
        self.progress.message(start.message)
        return state if start.continuing else None

    def _build_adversary(self, continuing: bool) -> Adversary | None:
        """The discriminator of ``--adversarial_loss_weight`` (None when 0), wrapped and restored
        like the model: weights from the starting checkpoint whenever it has them, its optimizer
        too when the run continues (the generator's optimizer is restored)."""
        if self.cfg.optim.adversarial_loss_weight <= 0:
            return None
        disc = build_discriminator(self.cfg.model)
        disc = ray.train.torch.prepare_model(disc)
        optimizer = build_disc_optimizer(ckpt.unwrap_model(disc), self.cfg.optim)
        if self._initial_state is not None:
            restore_opt = optimizer if continuing else None
            line = ckpt.restore_discriminator(self._initial_state, disc, restore_opt)
            self.progress.message(line)
        return Adversary(disc, optimizer, self.device, self.amp)

    def _restore_optimizer(self, state: dict) -> None:
        ckpt.restore_training_state(
            state,
            self.optimizer,
            self.scheduler,
            self.engine,
            rank=self.rank,
            seed=self.cfg.ray.seed,
            start_epoch=self.state.start_epoch,
        )

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        if self.state.start_epoch > cfg.optim.epochs:
            self._report_finished_run()
            return
        log_dir = self.outputs.log_dir if self.outputs is not None else cfg.output.log_dir
        reporter = TensorBoardReporter(log_dir, enabled=self.rank == 0)
        train_shard = ray.train.get_dataset_shard("train")
        val_shard = ray.train.get_dataset_shard("val")
        t_start = time.time()
        next_batches = self._prefetched_train_batches(train_shard)
        with reporter:
            for epoch in range(self.state.start_epoch, cfg.optim.epochs + 1):
                t0 = time.time()
                train_metrics = self._train_epoch(epoch, next_batches, reporter)
                train_time = time.time() - t0
                if epoch < cfg.optim.epochs:  # the next epoch's data starts during validation
                    next_batches = self._prefetched_train_batches(train_shard)
                val_sums = self._validate(val_shard)
                val_metrics = _require_finite(val_sums.means(), f"epoch {epoch}: validation")
                val_metrics.update(self._judged())
                # Throughput over the training pass only (as benchmarks measure it); the
                # epoch time includes validation.
                train_metrics["samples_per_sec"] = train_metrics.pop("samples") / train_time
                train_metrics["epoch_time_s"] = time.time() - t0
                self._record(epoch, train_metrics, val_metrics, val_sums, reporter)
                self._checkpoint_and_report(
                    epoch, train_metrics, val_metrics, time.time() - t_start
                )

    def _batches(self, shard, train: bool):
        bs = self.cfg.data.batch_size
        return shard.iter_torch_batches(
            batch_size=bs,
            drop_last=train,
            local_shuffle_buffer_size=4 * bs if train else None,
            device=self.device,
            dtypes=torch.float32,
        )

    def _prefetched_train_batches(self, shard) -> FirstItemPrefetch:
        return FirstItemPrefetch(lambda: self._batches(shard, train=True))

    def _train_epoch(
        self, epoch: int, batches: Iterable[dict], reporter: TensorBoardReporter
    ) -> dict[str, float]:
        self.model.train()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, image, pose, samples
        n_batches = self.batches_per_epoch
        steps_before, skipped_before = self.engine.optimizer_steps, self.engine.skipped_steps
        t0 = time.time()
        for i, batch in enumerate(batches):
            if i >= n_batches:  # equal batch counts on every rank keep DDP in step
                break
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

    def _account(self, m: StepMetrics, sums: torch.Tensor, reporter: TensorBoardReporter) -> None:
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
            if self.adversary is not None:
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

    def _validate(self, shard) -> EvalSums:
        sums = evaluate(
            ckpt.unwrap_model(self.model),
            self._batches(shard, train=False),
            self.cfg.optim,
            self.device,
            self.amp,
            keep_sample=self.rank == 0,
        )
        reduced = EvalSums.from_tensor(_all_reduce_sum(sums.to_tensor()))
        reduced.sample = sums.sample
        return reduced

    def _record(
        self, epoch: int, train: dict, val: dict, val_sums: EvalSums, reporter: TensorBoardReporter
    ) -> None:
        s = self.state
        s.train_history.append({"epoch": epoch, **train})
        s.val_history.append({"epoch": epoch, **val})
        s.best_val_loss = min(s.best_val_loss, val["loss"])
        self.is_best = (
            val["psnr"] > s.best_val_psnr
            if self.cfg.output.best_metric == "val_psnr"
            else val["loss"] <= s.best_val_loss
        )
        s.best_val_psnr = max(s.best_val_psnr, val["psnr"])
        if self.rank != 0:
            return
        reporter.log_epoch(epoch, train, val, train["samples_per_sec"])
        sample = val_sums.sample
        if sample is not None and (epoch % self.cfg.output.image_log_interval == 0 or epoch == 1):
            reporter.log_images(epoch, sample["source"], sample["target"], sample["output"])
            reporter.log_pose_histograms(epoch, sample["source_pose"], sample["target_pose"])
        reporter.flush()

    # -- checkpoints -------------------------------------------------------------------------
    def _state_dict(self, epoch: int, rank_rng_states: list[dict]) -> dict:
        s = self.state
        return ckpt.build_checkpoint(
            epoch=epoch,
            model=ckpt.unwrap_model(self.model),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            engine_state=self.engine.state_dict(),
            cfg=self.cfg,
            best_val_loss=s.best_val_loss,
            best_val_psnr=s.best_val_psnr,
            train_history=s.train_history,
            val_history=s.val_history,
            rng_state=rank_rng_states[0],
            rank_rng_states=rank_rng_states,
            model_signature=self.signature,
            trainable=self.trainable_names,
            discriminator=self.adversary and self.adversary.discriminator,
            discriminator_optimizer=self.adversary and self.adversary.optimizer,
        )

    def _report_finished_run(self) -> None:
        """The Ray checkpoint is the last epoch (e.g. a driver or Tune restarted after it): say
        so, report that epoch's metrics again for whoever waits on a result (Tune), and publish
        the final files again from the stored state in case an older run stopped before."""
        s, epoch = self.state, self.state.start_epoch - 1
        self.progress.message(f"nothing to train: the run already reached epoch {epoch}")
        if not (s.train_history and s.val_history):
            return
        ray.train.report(self._epoch_metrics(epoch, s.train_history[-1], s.val_history[-1], 0.0))
        if self.outputs is not None and self._ray_state_path:
            self.outputs.publish_final(self._ray_state_path, s.train_history, s.val_history)

    def _epoch_metrics(self, epoch: int, train: dict, val: dict, elapsed: float) -> dict:
        """What each epoch reports to Ray (and what the console line shows); never a NaN score
        (Ray's checkpoint ranking and Tune's schedulers break on one)."""
        metrics = {
            "epoch": epoch,
            "epochs": self.cfg.optim.epochs,
            "first_epoch": self.state.start_epoch,
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

    def _checkpoint_and_report(self, epoch: int, train: dict, val: dict, elapsed: float) -> None:
        """Every rank's RNG streams go into the checkpoint; rank 0 serialises the state once
        and hands the upload (and the files derived from it) to Ray's upload thread, so the
        other ranks wait at ``report`` for one ``torch.save`` only."""
        metrics = self._epoch_metrics(epoch, train, val, elapsed)
        rng_states = all_rng_states()
        if self.outputs is None:
            ray.train.report(metrics)
            return
        files = self._write_epoch_files(epoch, rng_states)

        def upload(_: ray.train.Checkpoint, checkpoint_dir_name: str) -> ray.train.Checkpoint:
            path = self.outputs.publish(files, checkpoint_dir_name)
            return ray.train.Checkpoint(path, filesystem=self.outputs.storage.fs)

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(files.checkpoint_dir),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=upload,
        )

    def _write_epoch_files(self, epoch: int, rng_states: list[dict]) -> EpochFiles:
        """Rank 0: the epoch's state and small files in its scratch folder (see outputs)."""
        o = self.cfg.output
        names = epoch_names(epoch, self.cfg.optim.epochs, o.save_interval, self.is_best)
        return self.outputs.write_epoch(
            epoch,
            self._state_dict(epoch, rng_states),
            names,
            self.state.train_history,
            self.state.val_history,
        )


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


REPORT_LOG_MODULE = "ray.train.v2._internal.execution.context"  # Ray 2.60's report logger


def _quiet_report_log(module: str = REPORT_LOG_MODULE) -> bool:
    """Ray 2.60 logs every report, all metrics, at INFO through a logger named after its source
    file, so ``LoggingConfig(log_level=...)`` misses it; the driver prints one line per epoch.

    The module is private to Ray: it is located, not imported, and a Ray without it only means
    louder logs. Returns whether the logger was found.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return False
    logging.getLogger(spec.origin).setLevel(logging.WARNING)
    return True


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point given to ``TorchTrainer``."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _quiet_report_log()
    WorkerRun(loop_config).run()
