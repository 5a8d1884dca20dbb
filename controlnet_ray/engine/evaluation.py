"""The evaluation pass: per-image sums (exactly all-reducible across workers) and their means."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from controlnet_ray.checkpoint import unwrap_model
from controlnet_ray.config import OptimConfig
from controlnet_ray.engine.amp import AmpSettings, _autocast
from controlnet_ray.engine.batch import BATCH_KEYS, Batch, _forward, move_batch
from controlnet_ray.engine.losses import LossTerms, compute_losses, pose_scale_deg
from controlnet_ray.metrics import pose_abs_error_deg, psnr_per_image, ssim_per_image

_SUM_FIELDS = (
    "n", "loss_sum", "image_loss_sum", "pose_loss_sum", "psnr_sum", "ssim_sum", "psnr_face_sum",
)  # fmt: skip


@dataclass
class EvalSums:
    """Per-image sums over an evaluation pass, so workers can all-reduce them exactly."""

    n: float = 0.0
    loss_sum: float = 0.0
    image_loss_sum: float = 0.0
    pose_loss_sum: float = 0.0
    psnr_sum: float = 0.0
    ssim_sum: float = 0.0
    psnr_face_sum: float = 0.0
    pose_abs_err_deg_sum: tuple[float, float, float] = (0.0, 0.0, 0.0)  # yaw, pitch, roll
    sample: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """float64 ``[10]`` vector (the sample is not included) for ``dist.all_reduce``."""
        values = [getattr(self, f) for f in _SUM_FIELDS] + list(self.pose_abs_err_deg_sum)
        return torch.tensor(values, dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> EvalSums:
        """Inverse of :meth:`to_tensor`."""
        values = t.detach().double().cpu().tolist()
        if len(values) != len(_SUM_FIELDS) + 3:
            raise ValueError(f"expected {len(_SUM_FIELDS) + 3} values, got {len(values)}")
        return cls(*values[: len(_SUM_FIELDS)], pose_abs_err_deg_sum=tuple(values[-3:]))

    def __add__(self, other: EvalSums) -> EvalSums:
        merged = EvalSums.from_tensor(self.to_tensor() + other.to_tensor())
        merged.sample = self.sample if self.sample is not None else other.sample
        return merged

    def means(self) -> dict[str, float]:
        """Dataset means; raises if nothing was evaluated (an empty split is a setup error)."""
        if self.n <= 0:
            raise ValueError("no evaluation samples: the split is empty on every worker")
        yaw, pitch, roll = (s / self.n for s in self.pose_abs_err_deg_sum)
        return {
            "loss": self.loss_sum / self.n,
            "image_loss": self.image_loss_sum / self.n,
            "pose_loss": self.pose_loss_sum / self.n,
            "psnr": self.psnr_sum / self.n,
            "ssim": self.ssim_sum / self.n,
            "psnr_face": self.psnr_face_sum / self.n,
            "pose_mae_deg": (yaw + pitch + roll) / 3.0,
            "pose_mae_yaw": yaw,
            "pose_mae_pitch": pitch,
            "pose_mae_roll": roll,
        }


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _limited(batches: Iterable[Batch], max_batches: int | None) -> Iterator[Batch]:
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def _batch_sums(
    output: Any,
    batch: Batch,
    terms: LossTerms,
    scale_deg: float,
    face_region: torch.Tensor | None,
) -> torch.Tensor:
    """This batch's contribution as a float64 ``[10]`` device tensor (no host sync)."""
    b = batch["source"].shape[0]
    losses = torch.stack([terms.total, terms.image, terms.pose]).detach().double() * b
    psnr = psnr_per_image(output.image, batch["target"]).sum()
    ssim = ssim_per_image(output.image, batch["target"]).sum()
    if face_region is None:
        psnr_face = psnr
    else:
        psnr_face = psnr_per_image(output.image, batch["target"], face_region).sum()
    quality = torch.stack([psnr, ssim, psnr_face]).double()
    pose_err = pose_abs_error_deg(output.pose_pred, batch["target_pose"], scale_deg).sum(0)
    n = torch.tensor([float(b)], dtype=torch.float64, device=losses.device)
    return torch.cat([n, losses, quality, pose_err.double()])


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    cfg: OptimConfig,
    device: torch.device,
    amp: AmpSettings,
    max_batches: int | None = None,
    keep_sample: bool = False,
    pose_scale: float | None = None,
    face_region: torch.Tensor | None = None,
) -> EvalSums:
    """Sum losses, PSNR, SSIM and pose errors over ``batches`` in eval mode, without grads.

    ``face_region`` (bool ``[H, W]``, ``metrics.face_mask`` of the data's framing) is where
    ``psnr_face`` is taken: the head, without the video's background, which no ID photo can
    predict and which makes whole-crop PSNR flat and noisy from the third epoch on (the
    best-model choice, ``--best_metric val_psnr_face``, needs a figure that tracks the face).
    Without it ``psnr_face`` equals ``psnr``.

    A DDP wrapper is bypassed (``model.module``): its forward may broadcast buffers, a
    collective that would hang when workers hold different numbers of validation batches.
    Sums stay on the device until the end (one sync).  ``keep_sample`` keeps the first
    batch's source/target/output (and poses) on the CPU for image logging.
    ``pose_scale`` overrides ``POSE_SCALE_DEG`` (for stand-in models in tests).
    """
    device = torch.device(device)
    net = unwrap_model(model)
    scale_deg = pose_scale if pose_scale is not None else pose_scale_deg()
    total = torch.zeros(len(_SUM_FIELDS) + 3, dtype=torch.float64, device=device)
    sample = None
    with _eval_mode(model), torch.no_grad():
        for batch in _limited(batches, max_batches):
            batch = move_batch(batch, device)
            with _autocast(device, amp):
                output = _forward(net, batch)
            terms = compute_losses(output, batch, cfg, scale_deg)
            total += _batch_sums(output, batch, terms, scale_deg, face_region)
            if keep_sample and sample is None:
                sample = _sample(batch, output)
    sums = EvalSums.from_tensor(total)
    sums.sample = sample
    return sums


def _sample(batch: Batch, output: Any) -> dict[str, torch.Tensor]:
    keep = {k: batch[k] for k in BATCH_KEYS} | {"output": output.image}
    return {k: v.detach().float().cpu() for k, v in keep.items()}
