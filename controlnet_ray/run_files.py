"""The one place that names a training run's files, says when each is written, and which
epoch is the best.

Users of the original script open these files by name (``torch.load("best_model.pth")``,
``training_history.json`` in their plots), so the names are a user-visible contract, pinned once
by ``tests/test_run_files.py``; everything else (the worker's loop, :mod:`controlnet_ray.outputs`,
the CLIs' messages, tests) takes them from here.

The best-model metric lives here too because it decides a file: ``best_model.pth`` is the
epoch that improved ``--best_metric``, and Ray's kept checkpoints are ranked by the same metric.

A leaf module (no torch, no ray): the driver's flag checks import it before torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# ------------------------------------------------------------------------ names in --save_dir
BEST_MODEL = "best_model.pth"
FINAL_MODEL = "final_model.pth"
HISTORY = "training_history.json"
FINAL_CURVES = "final_training_curves.png"
# The file inside each Ray checkpoint folder: the epoch's one serialisation, of which the
# ``.pth`` files above are byte-for-byte copies.
RAY_STATE_FILE = "state.pth"


def epoch_checkpoint(epoch: int) -> str:
    """``checkpoint_epoch_{N}.pth``: the original's numbered checkpoint."""
    return f"checkpoint_epoch_{epoch}.pth"


def epoch_curves(epoch: int) -> str:
    """``training_curves_epoch_{N}.png``, drawn beside the numbered checkpoint."""
    return f"training_curves_epoch_{epoch}.png"


# In --save_dir and --log_dir: which run (name and settings) wrote the files there, so a run of
# other settings sets them aside before it writes (a hidden file the original never had).
RUN_RECORD = ".controlnet_run.json"
TENSORBOARD_PREFIX = "events.out.tfevents."  # TensorBoard's event files in --log_dir


def is_save_dir_file(name: str) -> bool:
    """Whether ``name`` is one of the files a run leaves in ``--save_dir`` (only these are
    ever moved: the folder may hold a user's own files too)."""
    if name in (BEST_MODEL, FINAL_MODEL, HISTORY, FINAL_CURVES):
        return True
    for pattern in (epoch_checkpoint, epoch_curves):
        head, _, tail = pattern(0).partition("0")
        number = name.removeprefix(head).removesuffix(tail)
        if name.startswith(head) and name.endswith(tail) and number.isdigit():
            return True
    return False


def is_log_dir_file(name: str) -> bool:
    """Whether ``name`` is a TensorBoard event file a run leaves in ``--log_dir``."""
    return name.startswith(TENSORBOARD_PREFIX)


def in_dir(save_dir: str | os.PathLike[str], name: str) -> Path:
    """``<save_dir>/<name>``."""
    return Path(save_dir) / name


# ------------------------------------------------------------------------ the cadence


@dataclass(frozen=True)
class EpochNames:
    """Which of the original's files an epoch leaves."""

    copies: tuple[str, ...]  # names in save_dir that are the epoch's state, byte for byte
    curves: tuple[str, ...]  # curve PNGs drawn this epoch


def epoch_names(epoch: int, epochs: int, save_interval: int, is_best: bool) -> EpochNames:
    """The original's cadence: every ``save_interval`` epochs a numbered checkpoint and
    curves, ``best_model.pth`` when the epoch is the best so far, the final files last
    (``training_history.json`` every epoch)."""
    copies, curves = [], []
    if epoch % save_interval == 0:
        copies.append(epoch_checkpoint(epoch))
        curves.append(epoch_curves(epoch))
    if is_best:
        copies.append(BEST_MODEL)
    if epoch == epochs:
        copies.append(FINAL_MODEL)
        curves.append(FINAL_CURVES)
    return EpochNames(tuple(copies), tuple(curves))


def run_names(epochs: int, save_interval: int, first_epoch: int = 1) -> set[str]:
    """Every name a run training epochs ``first_epoch..epochs`` leaves in ``--save_dir`` (its
    first epoch is always the best so far, so ``best_model.pth`` is always among them)."""
    names = {HISTORY}
    for epoch in range(first_epoch, epochs + 1):
        chosen = epoch_names(epoch, epochs, save_interval, is_best=epoch == first_epoch)
        names.update(chosen.copies, chosen.curves)
    return names


# ------------------------------------------------------------------------ the best model

ScoreOrder = Literal["max", "min"]
# ``--best_metric`` (a reported metric) -> the direction that is better; the validation
# metrics' own key is the name without ``val_``.
BEST_METRIC_ORDER: dict[str, ScoreOrder] = {
    "val_psnr_face": "max",
    "val_psnr": "max",
    "val_loss": "min",
}


def score_order(metric: str) -> ScoreOrder:
    """``"max"`` or ``"min"``: how Ray ranks checkpoints (and Tune trials) by ``metric``."""
    try:
        return BEST_METRIC_ORDER[metric]
    except KeyError:
        raise ValueError(
            f"no best-model order for {metric!r}; known: {', '.join(BEST_METRIC_ORDER)}"
        ) from None


def improves(metric: str, val: Mapping[str, float], best: Mapping[str, float]) -> bool:
    """Whether this epoch's validation means ``val`` (keys ``loss``, ``psnr``) make it the best
    so far by ``metric``, against the best values before it (``best``: the same keys).

    Ties: a loss equal to the best counts (``<=``), a PSNR must beat it (``>``), as the
    worker always decided; a run's first epoch is always the best (bests start at +-inf).
    """
    key = metric.removeprefix("val_")
    if score_order(metric) == "max":
        return val[key] > best[key]
    return val[key] <= best[key]
