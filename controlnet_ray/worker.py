"""``train_loop_per_worker``: the only module that touches ``ray.train``'s context.

The training itself is :mod:`controlnet_ray.loop` (Ray-free, so tests run it in-process); this
module is its :class:`~controlnet_ray.loop.WorkerHost` on Ray Train: this worker's rank and
device, DDP preparation, the dataset shards, the starting checkpoint (this run's own, or the
``--resume`` file the driver put in the object store), and ``ray.train.report`` with rank 0's
checkpoint uploaded on Ray's upload thread (see :mod:`controlnet_ray.outputs`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from controlnet_ray import checkpoint as ckpt
from controlnet_ray.config import TrainConfig
from controlnet_ray.loop import EpochCheckpoint, WorkerSetup, run_worker
from controlnet_ray.run_files import RAY_STATE_FILE

GPU_PREFETCH_BATCHES = 4  # batches a GPU worker keeps in flight (Ray Data's default: 1)


class RayHost:
    """The loop's host on Ray Train (:class:`controlnet_ray.loop.WorkerHost`)."""

    def __init__(self, cfg: TrainConfig, resume_ref: Any = None) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.cfg = cfg
        self._resume_ref = resume_ref  # --resume, read by the driver into the object store
        self._shards: dict[bool, Any] = {}  # train -> its dataset shard, fetched on first use

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module)

    def starting_checkpoint(self) -> tuple[str | None, dict | None]:
        """This run's Ray checkpoint first (driver restart, worker failure), read from storage,
        then --resume; (None, None) without."""
        ray_ckpt = ray.train.get_checkpoint()
        if ray_ckpt is not None:
            with ray_ckpt.as_directory() as d:
                return ray_ckpt.path, ckpt.load_checkpoint(Path(d) / RAY_STATE_FILE)
        if self._resume_ref is not None:
            return "", ray.get(self._resume_ref)
        return None, None

    def batches(self, train: bool):
        if train not in self._shards:
            self._shards[train] = ray.train.get_dataset_shard("train" if train else "val")
        return self._batches(self._shards[train], train)

    def _batches(self, shard, train: bool):
        """The shard's batches as they arrive: uint8 images, already on the device (the loop
        normalises them). The dataset reshuffles every epoch (``data.pipeline``), so no local
        shuffle buffer. A GPU finishes a step in tens of milliseconds, so it keeps
        ``GPU_PREFETCH_BATCHES`` batches in flight rather than Ray's one."""
        prefetch = GPU_PREFETCH_BATCHES if self.device.type == "cuda" else 1
        return shard.iter_torch_batches(
            batch_size=self.cfg.data.batch_size,
            drop_last=train,
            device=self.device,
            dtypes=None,
            prefetch_batches=prefetch,
        )

    def report(self, metrics: dict[str, Any], saved: EpochCheckpoint | None) -> None:
        """``ray.train.report``; rank 0's checkpoint is published by Ray's upload thread (the
        copies are made before Ray registers it, so a registered epoch has its files)."""
        if saved is None:
            ray.train.report(metrics)
            return

        def upload(_: ray.train.Checkpoint, checkpoint_dir_name: str) -> ray.train.Checkpoint:
            path = saved.publish(checkpoint_dir_name)
            return ray.train.Checkpoint(path, filesystem=saved.outputs.storage.fs)

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(saved.local_dir),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=upload,
        )


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


def worker_setup(loop_config: dict[str, Any]) -> WorkerSetup:
    """The driver's ``loop_config`` (built by ``launcher.build_trainer``) as typed fields."""
    return WorkerSetup(
        cfg=TrainConfig.from_dict(loop_config["config"]),
        num_train_pairs=int(loop_config["num_train_pairs"]),
        torch_threads=int(loop_config.get("torch_threads", 1)),
        shards_dir=loop_config.get("shards_dir"),
        pose_estimate=loop_config.get("pose_estimate"),
        progress_board=loop_config.get("progress_board"),
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point given to ``TorchTrainer``."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _quiet_report_log()
    setup = worker_setup(loop_config)
    run_worker(setup, RayHost(setup.cfg, loop_config.get("resume_state")))
