"""A photo's pose estimated as the training data's single-image estimates were: the dataset's
mean face and measured bias (its preparation's pose report), so ``generate`` reads a photo as
the prepared data would have read it, and frames its head with the same face.

Checkpoints carry it (``pose_estimate``, :meth:`PhotoPoseModel.to_dict`) together with the
poses the model was trained on (the train split's ranges); a checkpoint without it (older runs,
the original script's files) gets :meth:`PhotoPoseModel.default`: :data:`MEAN_FACE_3D`, no bias,
no known range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from controlnet_ray.data.pose.mean_face import MEAN_FACE_3D
from controlnet_ray.data.pose.single_image import estimate_poses_generic
from controlnet_ray.data.pose.validation import _as_landmarks, _as_shape

AXES = ("yaw", "pitch", "roll")


@dataclass(frozen=True)
class PhotoPoseModel:
    """The single-image estimate's face, bias, and the training poses' range (if known)."""

    mean_face: np.ndarray = field(default_factory=lambda: MEAN_FACE_3D.copy())  # [5,3] mm
    bias_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    trained_range_deg: dict[str, tuple[float, float]] | None = None  # axis -> (low, high)

    @classmethod
    def default(cls) -> PhotoPoseModel:
        return cls()

    @classmethod
    def from_pose_report(cls, report: Mapping[str, Any]) -> PhotoPoseModel:
        """From a shard manifest's ``pose_report`` (``mean_face``, ``generic_bias_deg``, and the
        summary's train-split ranges); missing parts are the defaults."""
        summary = report.get("summary") or {}
        ranges = (summary.get("ranges") or {}).get("train")
        return cls.from_dict(
            {
                "mean_face": report.get("mean_face") or None,
                "bias_deg": report.get("generic_bias_deg"),
                "trained_range_deg": ranges,
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PhotoPoseModel:
        """:meth:`to_dict`'s inverse; None or missing fields are the defaults. ValueError names
        a malformed field."""
        d = d or {}
        face = d.get("mean_face")
        mean = MEAN_FACE_3D.copy() if face is None else _as_shape(face, "pose_estimate.mean_face")
        bias = np.asarray(d.get("bias_deg") or (0.0, 0.0, 0.0), np.float64)
        if bias.shape != (3,) or not np.isfinite(bias).all():
            raise ValueError(f"pose_estimate.bias_deg: expected 3 finite numbers, got {bias}")
        ranges = d.get("trained_range_deg")
        return cls(mean, tuple(float(b) for b in bias), _ranges(ranges))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and floats (a ``.pth``'s ``weights_only`` load and JSON take them)."""
        ranges = self.trained_range_deg
        return {
            "mean_face": np.asarray(self.mean_face, np.float64).round(4).tolist(),
            "bias_deg": [float(b) for b in self.bias_deg],
            "trained_range_deg": None if ranges is None else {a: list(ranges[a]) for a in AXES},
        }

    def estimate(self, landmarks_2d: np.ndarray, width: float, height: float) -> np.ndarray:
        """(yaw, pitch, roll) of one photo's five landmarks: the dataset fallback's estimate."""
        lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=False)
        return self.estimate_many(lm[None], np.array([[float(width), float(height)]]))[0]

    def estimate_many(self, landmarks_2d: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """[N,5,2], [N,2] -> [N,3] degrees (:func:`estimate_poses_generic` with this face)."""
        return estimate_poses_generic(landmarks_2d, sizes, self.mean_face, self.bias_deg)


def _ranges(ranges: Mapping[str, Any] | None) -> dict[str, tuple[float, float]] | None:
    if ranges is None:
        return None
    out = {}
    for axis in AXES:
        pair = np.asarray(ranges.get(axis, ()), np.float64).ravel()
        lo, hi = (float(pair[0]), float(pair[-1])) if pair.size == 2 else (np.nan, np.nan)
        if not (np.isfinite([lo, hi]).all() and lo <= hi):
            raise ValueError(f"pose_estimate.trained_range_deg.{axis}: bad range {lo}..{hi}")
        out[axis] = (lo, hi)
    return out
