"""What the loop needs from the process it runs in (:class:`WorkerHost`: Ray Train's context in
production, an in-process host in tests), what the driver gives every worker
(:class:`WorkerSetup`), and the saved epoch rank 0 hands to the host (:class:`EpochCheckpoint`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from controlnet_ray.config import TrainConfig
from controlnet_ray.outputs import EpochFiles, RankZeroOutputs

SCRATCH_ROOT = "controlnet_ray_rank0"  # under the node's temp folder: rank 0's local files


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
    pose_estimate: dict[str, Any] | None = None  # the data's single-image pose (checkpoints)
    progress_board: Any = None  # the driver's console actor; None prints lines here
    scratch_root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / SCRATCH_ROOT)
