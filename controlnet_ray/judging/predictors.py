"""Trivial predictors, fitted on training persons' real frames: what a model must beat.

Each predictor has the generator's call signature, ``(source, source_pose, target_pose) ->
images`` on ``[B, 3, H, W]`` tensors in ``[-1, 1]`` and ``[B, 3]`` degrees, so the scorer treats
them and the model alike:

* ``source``          the source image itself (a model that ignores the requested pose);
* ``mean``            the mean of the training persons' frames (the targets' role);
* ``pose_bin``        the mean of those frames *and their mirrors* (flipped, yaw and roll negated)
                      in the 10 x 10 deg (yaw, pitch) bin of the requested pose; an empty bin
                      takes the nearest filled bin (bin-centre distance);
* ``pose_bin_colour`` ``pose_bin`` with its face-region per-channel mean moved to the source's
                      (inside the face region only): the pose-bin mean in the person's colours.

Mirrors double the frames per bin and make the bins symmetric in yaw, as the model's mirror
augmentation makes its training data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from controlnet_ray.judging.data import to_model_range
from controlnet_ray.judging.pose_judge import mirror

BIN_DEG = 10.0
TRIVIAL = ("source", "mean", "pose_bin", "pose_bin_colour")
BEST_CANDIDATES = ("pose_bin", "pose_bin_colour")  # the "best trivial predictor"

Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pose_bin(yaw: float, pitch: float) -> tuple[int, int]:
    """The (yaw, pitch) bin of a pose: ``floor(angle / 10 deg)`` per axis."""
    return int(math.floor(yaw / BIN_DEG)), int(math.floor(pitch / BIN_DEG))


@dataclass
class PoseBinMeans:
    """Per-bin mean images ``[3, H, W]`` in ``[-1, 1]`` and the frame count behind each."""

    means: dict[tuple[int, int], torch.Tensor]
    counts: dict[tuple[int, int], int]
    overall: torch.Tensor

    def lookup(self, target_pose: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]``: each requested pose's bin mean (nearest filled bin if empty)."""
        keys = list(self.means)
        centres = np.asarray(keys, np.float64)
        out = []
        for yaw, pitch, _ in target_pose.tolist():
            key = pose_bin(yaw, pitch)
            if key not in self.means:
                d = np.linalg.norm(centres - np.asarray(key, np.float64), axis=1)
                key = keys[int(np.argmin(d))]
            out.append(self.means[key])
        return torch.stack(out)


def fit_pose_bins(
    images: torch.Tensor, poses: torch.Tensor, with_mirrors: bool = True
) -> PoseBinMeans:
    """Bin means of ``[N, 3, H, W]`` frames (plus their mirrors) by their (yaw, pitch)."""
    if with_mirrors:
        flipped, flipped_poses = mirror(images, poses)
        images, poses = torch.cat([images, flipped]), torch.cat([poses, flipped_poses])
    sums: dict[tuple[int, int], torch.Tensor] = {}
    counts: dict[tuple[int, int], int] = {}
    for img, (yaw, pitch, _) in zip(images.double(), poses.tolist(), strict=True):
        key = pose_bin(yaw, pitch)
        sums[key] = sums[key] + img if key in sums else img.clone()
        counts[key] = counts.get(key, 0) + 1
    means = {k: (v / counts[k]).float() for k, v in sums.items()}
    return PoseBinMeans(means, counts, images.double().mean(dim=0).float())


def shift_face_colour(
    images: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``images`` with each channel's mean over ``mask`` moved to ``reference``'s (inside the
    mask only; clamped to ``[-1, 1]``)."""
    m = mask.to(images.device, torch.float32)
    area = m.sum()

    def face_mean(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * m).sum(dim=(2, 3), keepdim=True) / area

    shifted = images.float() + (face_mean(reference) - face_mean(images)) * m
    return shifted.clamp(-1.0, 1.0)


@dataclass
class TrivialPredictors:
    """The four trivial predictors, fitted once on training frames."""

    mean_image: torch.Tensor  # [3, H, W]
    bins: PoseBinMeans
    mask: torch.Tensor  # [H, W] bool: the face region for the colour shift
    frames: int

    def source(
        self, source: torch.Tensor, source_pose: torch.Tensor, target_pose: torch.Tensor
    ) -> torch.Tensor:
        return source

    def mean(
        self, source: torch.Tensor, source_pose: torch.Tensor, target_pose: torch.Tensor
    ) -> torch.Tensor:
        return self.mean_image.to(source.device).expand_as(source)

    def pose_bin(
        self, source: torch.Tensor, source_pose: torch.Tensor, target_pose: torch.Tensor
    ) -> torch.Tensor:
        return self.bins.lookup(target_pose).to(source.device)

    def pose_bin_colour(
        self, source: torch.Tensor, source_pose: torch.Tensor, target_pose: torch.Tensor
    ) -> torch.Tensor:
        return shift_face_colour(self.pose_bin(source, source_pose, target_pose), source, self.mask)

    def as_dict(self) -> dict[str, Predictor]:
        """``{name: predictor}`` in :data:`TRIVIAL` order."""
        return {name: getattr(self, name) for name in TRIVIAL}


def fit_trivial_predictors(
    images: np.ndarray, poses: np.ndarray, mask: torch.Tensor
) -> TrivialPredictors:
    """Fit on training persons' real frames: uint8 ``[N, H, W, 3]`` and ``[N, 3]`` degrees.

    ``mask`` is the face region the colour-shifted variant matches colours on (the scorer's).
    """
    if len(images) == 0:
        raise ValueError("no training frames to fit the trivial predictors on")
    x = to_model_range(images)
    p = torch.as_tensor(np.asarray(poses, np.float32))
    return TrivialPredictors(x.double().mean(dim=0).float(), fit_pose_bins(x, p), mask, len(x))
