"""Poses the inference commands accept: the range a model accepts (refused beyond, never
clamped), the range it was trained on (warned beyond), the convention written into exports,
and ``--sweep`` values."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controlnet_ray.data.geometry import POSE_LIMITS_DEG
from controlnet_ray.inference.errors import InferenceError

AXES = ("yaw", "pitch", "roll")
#: The poses a model was trained on when its checkpoint does not say (older files, the original
#: script's): the embedded dataset's video range (``data.synthetic.views``).
DOCUMENTED_TRAINED_RANGE_DEG = {"yaw": (-72.0, 72.0), "pitch": (-30.0, 30.0), "roll": (-20.0, 20.0)}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
POSE_CONVENTION = (
    "(yaw, pitch, roll) in degrees; R = Rz(roll) @ Rx(-pitch) @ Ry(yaw); 0 = facing the camera; "
    "yaw > 0 turns the nose towards the image's right, pitch > 0 lifts the nose, roll > 0 tilts "
    "the head counter-clockwise in the image (controlnet_ray.data.geometry)"
)


def check_pose(pose: Sequence[float], what: str) -> tuple[float, float, float]:
    """``pose`` as floats, or InferenceError naming ``what`` when outside the range a model
    accepts (:data:`POSE_LIMITS_DEG`)."""
    values = tuple(float(v) for v in pose)
    for axis, value in zip(AXES, values, strict=True):
        limit = POSE_LIMITS_DEG[axis]
        if not math.isfinite(value) or abs(value) > limit:
            raise InferenceError(
                f"{what} {axis} = {value:g} deg is outside the range a model accepts "
                f"(yaw +-{POSE_LIMITS_DEG['yaw']:g}, pitch +-{POSE_LIMITS_DEG['pitch']:g}, "
                f"roll +-{POSE_LIMITS_DEG['roll']:g}); angles are refused, not clamped"
            )
    return values  # type: ignore[return-value]


def beyond_training(
    poses: Sequence[Sequence[float]], trained: Mapping[str, tuple[float, float]] | None
) -> str | None:
    """A warning when any of ``poses`` lies beyond the poses the model was trained on
    (``trained``: its checkpoint's, else :data:`DOCUMENTED_TRAINED_RANGE_DEG`); None if none."""
    ranges = dict(trained or DOCUMENTED_TRAINED_RANGE_DEG)
    beyond = []
    for k, axis in enumerate(AXES):
        lo, hi = ranges[axis]
        values = sorted({float(p[k]) for p in poses if not lo <= float(p[k]) <= hi})
        if values:
            shown = ", ".join(f"{v:+g}" for v in values[:4]) + (" ..." if len(values) > 4 else "")
            beyond.append(f"{axis} {shown} (trained {lo:+.0f}..{hi:+.0f})")
    if not beyond:
        return None
    source = "the checkpoint's training data" if trained else "the documented range"
    return (
        f"warning: requested poses beyond those the model was trained on ({source}): "
        f"{'; '.join(beyond)}; expect worse faces there"
    )


def format_pose(pose: Sequence[float]) -> str:
    return ", ".join(f"{a} {float(v):+.1f}" for a, v in zip(AXES, pose, strict=True))


@dataclass(frozen=True)
class Sweep:
    """One swept axis: ``yaw=-60:60:15`` (start:stop:step, stop included) or ``yaw=-30,0,30``."""

    axis: str
    values: tuple[float, ...]


MAX_SWEEP_VALUES = 181


def parse_sweep(text: str) -> Sweep:
    """Parse one ``--sweep`` value; InferenceError says what is wrong with it."""
    match = re.fullmatch(r"\s*(\w+)\s*=\s*(.+)", text)
    if not match or match.group(1) not in AXES:
        raise InferenceError(
            f"--sweep {text!r}: expected AXIS=START:STOP:STEP or AXIS=V1,V2,... with AXIS one "
            f"of {', '.join(AXES)} (e.g. yaw=-60:60:15)"
        )
    axis, spec = match.group(1), match.group(2)
    try:
        values = _range_values(spec) if ":" in spec else [float(v) for v in spec.split(",")]
    except ValueError as exc:
        raise InferenceError(f"--sweep {text!r}: {exc}") from None
    if not 1 <= len(values) <= MAX_SWEEP_VALUES:
        raise InferenceError(f"--sweep {text!r}: gives {len(values)} values (1..181 allowed)")
    return Sweep(axis, tuple(values))


def _range_values(spec: str) -> list[float]:
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError("a range is START:STOP:STEP")
    start, stop, step = (float(p) for p in parts)
    if step == 0 or (stop - start) * step < 0 or not all(map(math.isfinite, (start, stop, step))):
        raise ValueError("STEP must be non-zero and point from START towards STOP")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_SWEEP_VALUES:
        raise ValueError(f"gives {count} values (1..{MAX_SWEEP_VALUES} allowed)")
    return [round(start + i * step, 9) for i in range(count)]
