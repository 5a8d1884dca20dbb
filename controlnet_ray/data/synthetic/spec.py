"""What to render: the dataset spec (its hash is the cache key) and the per-image conditions
(light, background, head placement) that views vary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np

# Bump when the rendered output changes (in any module of this package), so cached datasets
# are regenerated: the cache key is SyntheticSpec.digest(), which hashes the spec and this
# number, never the source code.
RENDER_VERSION = 1
SUPERSAMPLE = 2  # subpixels per output pixel along each axis (anti-aliasing)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to render; its hash names the cache folder, so every field must change the output.

    The size and seed have no defaults here: training's are ``DataConfig``'s
    (``--synthetic_identities``, ``--synthetic_frames``, ``--synthetic_seed``), their one home.
    """

    num_identities: int
    frames_per_identity: int
    seed: int
    image_px: int = 160

    def __post_init__(self) -> None:
        if self.num_identities < 1 or self.frames_per_identity < 1:
            raise ValueError(f"need >= 1 identity and >= 1 frame per identity, got {self}")
        if self.image_px < 16:
            raise ValueError(f"image_px must be >= 16, got {self.image_px}")

    def digest(self) -> str:
        """Stable short hash of the spec and the renderer version (the cache key)."""
        payload = json.dumps({**dataclasses.asdict(self), "v": RENDER_VERSION}, sort_keys=True)
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Lighting:
    """One directional light plus ambient; direction is in the camera frame, towards the light."""

    direction: tuple[float, float, float] = (0.0, -0.35, -1.0)
    color: tuple[float, float, float] = (1.0, 1.0, 0.98)
    ambient: float = 0.5
    diffuse: float = 0.6


@dataclass(frozen=True)
class Background:
    """Plain gradient (ID photo) or cluttered, seeded, drifting scene (phone video)."""

    kind: Literal["plain", "cluttered"] = "plain"
    top: tuple[float, float, float] = (0.90, 0.91, 0.93)
    bottom: tuple[float, float, float] = (0.82, 0.84, 0.87)
    seed: int = 0
    drift: tuple[float, float] = (0.0, 0.0)  # shift of the clutter, in image widths
    blur: float = 1.0  # Gaussian sigma in pixels (out-of-focus background)


@dataclass(frozen=True)
class Placement:
    """Where the head sits in the camera frame: translation in millimetres (OpenCV axes)."""

    tx: float = 0.0
    ty: float = -15.0
    tz: float = 350.0

    def translation(self) -> np.ndarray:
        return np.array([self.tx, self.ty, self.tz], dtype=np.float64)
