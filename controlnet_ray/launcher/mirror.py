"""The run's outputs on the driver: ``--save_dir`` and ``--log_dir`` copied down from the run's
storage while it trains (TensorBoard sees each epoch wherever rank 0 runs) and once at the end.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from controlnet_ray.config import TrainConfig

MIRROR_INTERVAL_S = 10.0  # how often the driver copies new outputs down while a run trains


def materialise_outputs(cfg: TrainConfig) -> list[Path]:
    """Copy what the run left in its storage into --save_dir / --log_dir where the driver
    runs (hard links when the storage is a local folder); returns the files that changed."""
    from controlnet_ray.storage import LOG_DIR, SAVE_DIR, RunStorage

    storage = RunStorage.open(cfg.storage_path(), cfg.run_name())
    changed = storage.materialise(storage.path(SAVE_DIR), Path(cfg.output.save_dir))
    return changed + storage.materialise(storage.path(LOG_DIR), Path(cfg.output.log_dir))


class OutputMirror:
    """While a run trains, keeps --save_dir / --log_dir following its storage (TensorBoard
    pointed at --log_dir sees each epoch, wherever rank 0 runs); on exit, one last copy."""

    def __init__(self, cfg: TrainConfig, interval_s: float = MIRROR_INTERVAL_S) -> None:
        self.cfg, self.interval_s = cfg, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="output-mirror", daemon=True)

    def __enter__(self) -> OutputMirror:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            materialise_outputs(self.cfg)
        except OSError as exc:
            if exc_type is None:  # a failed run's own error says more than this one
                raise
            print(f"could not copy the run's outputs down: {exc}", flush=True)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                materialise_outputs(self.cfg)
            except OSError as exc:  # a storage hiccup must not stop training; the end retries
                print(f"outputs not copied down this time: {exc}", flush=True)


def fit_with_outputs(cfg: TrainConfig, trainer: Any) -> Any:
    """``trainer.fit()`` with the run's outputs copied down to the driver as they appear."""
    with OutputMirror(cfg):
        return trainer.fit()
