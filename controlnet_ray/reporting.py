"""TensorBoard summaries, history JSON and curve PNGs, under the original script's names.

Dashboards and scripts built on the original read tags such as ``Train/Loss`` and
``Epoch/ValPSNR``; those names are kept exactly and new ones only added.  Nothing non-finite
reaches a file: NaN/inf scalars are skipped (and counted), JSON gets ``null``.

Metric keys expected from the engine (``train_`` / ``val_`` prefixes are accepted and dropped):
``loss``, ``image_loss``, ``pose_loss``, ``lr`` (per step), ``psnr``, ``ssim``, ``pose_mae`` (or
``pose_mae_deg``) and ``pose_mae_yaw|pitch|roll`` (degrees).  Keys already spelled as the tag's
suffix (``Loss``, ``ImageLoss``, ``LearningRate``) map to the same tag.  Other keys are logged
under a CamelCase tag (``identity_loss`` -> ``Train/IdentityLoss``).

Nothing here imports ray, and matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` so the
process-wide backend is never changed.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from controlnet_ray.files import atomic_write, atomic_write_text, dumps_strict, is_finite

logger = logging.getLogger(__name__)

HISTORY_FORMAT_VERSION = 1

STEP_TAGS = {
    "loss": "Train/Loss",
    "image_loss": "Train/ImageLoss",
    "pose_loss": "Train/PoseLoss",
    "lr": "Train/LearningRate",
    "learning_rate": "Train/LearningRate",
}
TRAIN_EPOCH_TAGS = {
    "loss": "Epoch/TrainLoss",
    "image_loss": "Epoch/TrainImageLoss",
    "pose_loss": "Epoch/TrainPoseLoss",
}
VAL_EPOCH_TAGS = {
    "loss": "Epoch/ValLoss",
    "image_loss": "Epoch/ValImageLoss",
    "psnr": "Epoch/ValPSNR",
    "psnr_face": "Epoch/ValPSNRFace",
    "ssim": "Epoch/ValSSIM",
    "pose_mae": "Epoch/ValPoseMAE",
    "pose_mae_deg": "Epoch/ValPoseMAE",
    "pose_mae_yaw": "Epoch/ValPoseMAE_yaw",
    "pose_mae_pitch": "Epoch/ValPoseMAE_pitch",
    "pose_mae_roll": "Epoch/ValPoseMAE_roll",
}
SAMPLES_PER_SEC_TAG = "Epoch/SamplesPerSec"
COMPARISON_TAG = "Images/Comparison"
SAMPLE_TAG = "Images/Sample_{i}"
POSE_HIST_TAGS = ("Pose/Target", "Pose/Source", "Pose/Difference")
_PAD = 2  # pixels between tiles of an image grid
_AXES = ("pose_mae_yaw", "pose_mae_pitch", "pose_mae_roll")
_JUDGED_POSE = (
    "judged_yaw_err_deg",
    "judged_pitch_err_deg",
    "judge_floor_yaw_deg",
    "judge_floor_pitch_deg",
)


def _strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def _camel(key: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in key.split("_"))


class TensorBoardReporter:
    """Writes the original's TensorBoard tags; ``enabled=False`` makes every call a no-op.

    Non-zero ranks pass ``enabled=False`` so only one process writes event files and no
    directory is created for them.  ``skipped`` counts values withheld for being non-finite.
    """

    def __init__(self, log_dir: str | os.PathLike[str], enabled: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self.skipped: Counter[str] = Counter()
        self._writer = None
        if enabled:
            # Imported here: tensorboard is heavy and non-writing ranks never need it.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def __enter__(self) -> TensorBoardReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Per optimiser step: ``Train/Loss``, ``Train/ImageLoss``, ``Train/PoseLoss``, LR."""
        for key, value in metrics.items():
            key = _strip_prefix(key, "train_")
            self._scalar(STEP_TAGS.get(key, f"Train/{_camel(key)}"), value, step)

    def log_epoch(
        self,
        epoch: int,
        train: Mapping[str, Any],
        val: Mapping[str, Any],
        samples_per_sec: float | None = None,
    ) -> None:
        """Per epoch: ``Epoch/Train*``, ``Epoch/Val*`` and ``Epoch/SamplesPerSec``.

        A ``samples_per_sec`` entry in ``train`` goes to ``Epoch/SamplesPerSec`` too (the
        argument wins when both are given).
        """
        for key, value in train.items():
            key = _strip_prefix(key, "train_")
            if key == "samples_per_sec":  # throughput has its own tag, not a train metric
                samples_per_sec = value if samples_per_sec is None else samples_per_sec
                continue
            self._scalar(TRAIN_EPOCH_TAGS.get(key, f"Epoch/Train{_camel(key)}"), value, epoch)
        for key, value in val.items():
            key = _strip_prefix(key, "val_")
            self._scalar(VAL_EPOCH_TAGS.get(key, f"Epoch/Val{_camel(key)}"), value, epoch)
        if samples_per_sec is not None:
            self._scalar(SAMPLES_PER_SEC_TAG, samples_per_sec, epoch)

    def log_images(
        self,
        epoch: int,
        source: torch.Tensor,
        target: torch.Tensor,
        output: torch.Tensor,
        max_samples: int = 4,
    ) -> None:
        """``Images/Comparison`` (rows: source, target, output) and ``Images/Sample_{i}``.

        Inputs are ``[B, 3, H, W]`` in ``[-1, 1]``; at most ``max_samples`` are shown.
        """
        if self._writer is None:
            return
        rows = [_to_unit(t[:max_samples]) for t in (source, target, output)]
        self._image(COMPARISON_TAG, image_grid(rows, border=False), epoch)
        for i in range(rows[0].shape[0]):
            sample = image_grid([[r[i] for r in rows]], border=False)
            self._image(SAMPLE_TAG.format(i=i), sample, epoch)

    def log_pose_histograms(
        self, epoch: int, source_pose: torch.Tensor, target_pose: torch.Tensor
    ) -> None:
        """``Pose/Target``, ``Pose/Source``, ``Pose/Difference`` (target - source), degrees."""
        if self._writer is None:
            return
        src = source_pose.detach().float().cpu()
        tgt = target_pose.detach().float().cpu()
        for tag, values in zip(POSE_HIST_TAGS, (tgt, src, tgt - src), strict=True):
            self._histogram(tag, values, epoch)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.skipped:
            logger.warning("TensorBoard: withheld non-finite values: %s", dict(self.skipped))

    def _skip(self, tag: str) -> None:
        if not self.skipped[tag]:
            logger.warning("TensorBoard: non-finite value for %s not written", tag)
        self.skipped[tag] += 1

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if self._writer is None:
            return
        if not is_finite(value):
            self._skip(tag)
            return
        self._writer.add_scalar(tag, float(value), step)

    def _image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if not torch.isfinite(image).all():
            self._skip(tag)
            return
        self._writer.add_image(tag, image, step, dataformats="CHW")

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        values = values.flatten()
        finite = values[torch.isfinite(values)]
        if finite.numel() < values.numel():
            self._skip(tag)  # the finite part is still worth a histogram
        if finite.numel():
            self._writer.add_histogram(tag, finite, step)


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` -> ``[0, 1]`` float on CPU (NaN kept so the caller can skip the image)."""
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def image_grid(
    rows: Sequence[Sequence[torch.Tensor]],
    pad: int = _PAD,
    fill: float = 1.0,
    border: bool = True,
) -> torch.Tensor:
    """Tile ``rows`` of equally sized ``[C, H, W]`` images into one ``[C, H', W']`` image, the
    package's one grid (TensorBoard here, ``inference.grid`` for PNGs): ``pad`` pixels of
    ``fill`` between tiles (and around them when ``border``); short rows end in ``fill``."""
    from torchvision.utils import make_grid

    cols = max(len(r) for r in rows)
    blank = torch.full_like(rows[0][0], fill)
    tiles = [t for row in rows for t in (*row, *[blank] * (cols - len(row)))]
    if len(tiles) == 1:  # make_grid returns a single image as it is, unpadded
        grid = torch.nn.functional.pad(tiles[0], (pad, pad, pad, pad), value=fill)
    else:
        grid = make_grid(tiles, nrow=cols, padding=pad, pad_value=fill)
    return grid if border else grid[:, pad : grid.shape[1] - pad, pad : grid.shape[2] - pad]


# --------------------------------------------------------------------------- history JSON


def write_history_json(
    path: str | os.PathLike[str],
    train_history: Sequence[Mapping[str, Any]],
    val_history: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write per-epoch histories as strict JSON (NaN/inf -> null).

    Layout: ``{"format_version": 1, "train": [...], "val": [...], "extra": {...}}``, one dict of
    metrics per epoch (the checkpoint's ``train_metrics_history`` / ``val_metrics_history``).
    """
    doc = {
        "format_version": HISTORY_FORMAT_VERSION,
        "train": list(train_history),
        "val": list(val_history),
        "extra": dict(extra or {}),
    }
    return atomic_write_text(path, dumps_strict(doc) + "\n")


def load_history_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file from :func:`write_history_json`; missing metrics come back as ``None``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"history file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid history JSON: {exc}") from exc
    if not isinstance(doc, dict) or "train" not in doc:
        raise ValueError(f"{path}: not a history file (no 'train' key)")
    doc.setdefault("val", [])
    doc.setdefault("extra", {})
    return doc


# --------------------------------------------------------------------------- curves PNG


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) for ``key``; absent / None / non-finite entries become gaps (NaN)."""
    xs, ys = [], []
    for i, entry in enumerate(history):
        entry = {_strip_prefix(_strip_prefix(k, "train_"), "val_"): v for k, v in entry.items()}
        value = entry.get(key)
        xs.append(float(entry.get("epoch", i + 1)))
        ys.append(float(value) if is_finite(value) else math.nan)
    return xs, ys


def _has(history: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(is_finite(v) for v in _series(history, key)[1])


def _panels(train: Sequence[Mapping], val: Sequence[Mapping]) -> list[tuple[str, list]]:
    """(title, [(label, history, key)]) for each panel that has data."""
    candidates = [
        ("Total loss", [("train", train, "loss"), ("val", val, "loss")]),
        ("Image loss", [("train", train, "image_loss"), ("val", val, "image_loss")]),
        ("Pose loss", [("train", train, "pose_loss"), ("val", val, "pose_loss")]),
        ("Val PSNR (dB)", [("val", val, "psnr")]),
        ("Val SSIM", [("val", val, "ssim")]),
        ("Val pose MAE (deg)", [("val", val, k) for k in ("pose_mae", "pose_mae_deg", *_AXES)]),
        ("Held-out judged pose err (deg)", [("", val, k) for k in _JUDGED_POSE]),
        ("Face PSNR over best trivial (dB)", [("", val, "face_margin_db")]),
    ]
    return [
        (title, [line for line in lines if _has(line[1], line[2])])
        for title, lines in candidates
        if any(_has(h, k) for _, h, k in lines)
    ]


def save_curves_png(
    train_history: Sequence[Mapping[str, Any]],
    val_history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
) -> Path:
    """Atomically write a PNG with one panel per metric family present in the histories."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(train_history, val_history) or [("No metrics yet", [])]
    n_cols = min(3, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    fig = Figure(figsize=(5 * n_cols, 3.6 * n_rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        for label, history, key in lines:
            xs, ys = _series(history, key)
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{label} {key}".strip())
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))
