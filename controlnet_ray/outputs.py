"""Rank 0's files of each epoch: serialised once locally, published to the run's storage.

Why this shape: the other ranks wait at ``ray.train.report`` while rank 0 saves, so the
training thread does only what must happen before the weights change again (one
``torch.save`` of the full state, plus the small history/curves files); everything else runs
in Ray's checkpoint upload thread (:meth:`RankZeroOutputs.publish`): the upload of that one
file as the Ray checkpoint, then ``best_model.pth`` / ``checkpoint_epoch_N.pth`` /
``final_model.pth`` as copies of it inside the storage (server-side on object stores, hard
links on a file system), then history, curves and the flushed part of the TensorBoard events.

Which files an epoch leaves, and their names, is :mod:`controlnet_ray.run_files`'s to say.
Nothing here imports ray: the worker hands :meth:`RankZeroOutputs.publish` to Ray.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlnet_ray import run_files
from controlnet_ray.files import atomic_save
from controlnet_ray.reporting import save_curves_png, write_history_json
from controlnet_ray.run_files import RAY_STATE_FILE, EpochNames
from controlnet_ray.storage import LOG_DIR, SAVE_DIR, RunStorage

CHECKPOINTS_DIR = "ray_checkpoints"  # under the scratch folder: one folder per epoch


@dataclass
class EpochFiles:
    """What one epoch wrote locally and must publish (built on the training thread)."""

    epoch: int
    checkpoint_dir: Path  # holds RAY_STATE_FILE: the epoch's one serialisation
    copies: tuple[str, ...]
    small_files: list[Path] = field(default_factory=list)  # in the scratch save_dir
    events: dict[Path, int] = field(default_factory=dict)  # TensorBoard file -> flushed size


class RankZeroOutputs:
    """Rank 0's scratch folder on its own node and the run storage it publishes to."""

    def __init__(self, storage: RunStorage, scratch: Path) -> None:
        self.storage = storage
        self.scratch = Path(scratch)
        # A worker or driver killed mid-report leaves its files here; a new attempt removes them.
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.save_dir = self.scratch / SAVE_DIR
        self.log_dir = self.scratch / LOG_DIR
        for d in (self.save_dir, self.log_dir, self.scratch / CHECKPOINTS_DIR):
            d.mkdir(parents=True, exist_ok=True)

    def write_epoch(
        self,
        epoch: int,
        state: Mapping[str, Any],
        names: EpochNames,
        train_history: Sequence[Mapping[str, Any]],
        val_history: Sequence[Mapping[str, Any]],
    ) -> EpochFiles:
        """The training thread's part: the state serialised once, history and curves
        written, the TensorBoard files' flushed sizes noted (they keep growing afterwards)."""
        ckpt_dir = self.scratch / CHECKPOINTS_DIR / f"epoch_{epoch}"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_save(state, ckpt_dir / RAY_STATE_FILE)
        files = EpochFiles(epoch, ckpt_dir, names.copies)
        files.small_files = self._write_small(names, train_history, val_history)
        files.events = {p: p.stat().st_size for p in self.log_dir.rglob("*") if p.is_file()}
        return files

    def _write_small(
        self, names: EpochNames, train_history: Sequence, val_history: Sequence
    ) -> list[Path]:
        history = self.save_dir / run_files.HISTORY
        written = [write_history_json(history, train_history, val_history)]
        for name in names.curves:
            written.append(save_curves_png(train_history, val_history, self.save_dir / name))
        return written

    def publish(self, files: EpochFiles, checkpoint_dir_name: str) -> str:
        """The upload thread's part; returns the Ray checkpoint's path in the storage.

        The copies are made before Ray registers the checkpoint, so a registered epoch always
        has its files in the storage."""
        s = self.storage
        ckpt_path = s.upload_dir(files.checkpoint_dir, s.path(checkpoint_dir_name))
        for name in files.copies:
            s.copy(f"{ckpt_path}/{RAY_STATE_FILE}", s.path(SAVE_DIR, name))
        for path in files.small_files:
            s.put_file(path, s.path(SAVE_DIR, path.relative_to(self.save_dir).as_posix()))
        for path, size in files.events.items():
            s.put_file(path, s.path(LOG_DIR, path.relative_to(self.log_dir).as_posix()), size)
        return ckpt_path

    def publish_final(
        self, state_path: str, train_history: Sequence, val_history: Sequence
    ) -> None:
        """A run restarted after its last epoch: the final files again, from the stored state
        (no serialisation), in case an older version's run stopped before writing them."""
        s = self.storage
        s.copy(state_path, s.path(SAVE_DIR, run_files.FINAL_MODEL))
        names = EpochNames((), (run_files.FINAL_CURVES,))
        for path in self._write_small(names, train_history, val_history):
            s.put_file(path, s.path(SAVE_DIR, path.name))
