"""The views of one identity: the near-frontal ID photo and the phone video (pose sweep,
moving light, drifting clutter, sensor noise), and the per-identity random streams."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from controlnet_ray.data.synthetic.identity import _u
from controlnet_ray.data.synthetic.render import render_face
from controlnet_ray.data.synthetic.shapes import Identity
from controlnet_ray.data.synthetic.spec import Background, Lighting, Placement


@dataclass(frozen=True)
class View:
    """Everything that varies per image of one identity."""

    role: Literal["front", "video"]
    index: int
    yaw: float
    pitch: float
    roll: float
    lighting: Lighting
    background: Background
    placement: Placement
    noise: float  # sensor noise sigma, in 0..1 intensity units


_LIGHT_TINTS = np.array(
    [[1.0, 0.82, 0.62], [0.80, 0.90, 1.05], [1.0, 1.0, 1.0], [0.88, 1.0, 0.86], [1.05, 0.88, 0.95]]
)


def identity_rngs(seed: int, index: int) -> list[np.random.Generator]:
    """Independent streams (identity, views, landmark noise) keyed by (seed, identity index).

    Keying by index (not by draw order) keeps the output identical for any worker count.
    """
    children = np.random.SeedSequence([seed, index, 0x5F17]).spawn(3)
    return [np.random.default_rng(c) for c in children]


def person_name(index: int, num_identities: int) -> str:
    """``synth_0007``; with >= 6 identities one non-ASCII name and one with a space (quirks)."""
    if num_identities >= 6 and index == 3:
        return f"合成_{index:04d}"
    if num_identities >= 6 and index == 5:
        return f"synth {index:04d}"
    return f"synth_{index:04d}"


def front_view(rng: np.random.Generator) -> View:
    """A near-frontal ID photo: plain light background, even frontal light, sharp and clean."""
    yaw, pitch = rng.uniform(-4, 4, 2)
    tone = _u(rng, 0.84, 0.95)
    tint = rng.uniform(-0.03, 0.03, 3)
    top = tuple(float(v) for v in np.clip(tone + tint, 0, 1))
    bottom = tuple(float(v) for v in np.clip(tone - 0.06 + tint, 0, 1))
    return View(
        role="front",
        index=0,
        yaw=float(yaw),
        pitch=float(pitch),
        roll=_u(rng, -2, 2),
        lighting=Lighting((_u(rng, -0.08, 0.08), -0.3, -1.0), (1.0, 1.0, 0.98), 0.55, 0.55),
        background=Background("plain", top, bottom),
        placement=Placement(_u(rng, -5, 5), -15 + _u(rng, -5, 5), _u(rng, 340, 360)),
        noise=0.0,
    )


def video_views(rng: np.random.Generator, n: int) -> list[View]:
    """A phone video: smooth pose sweep (yaw ~ +-70, pitch ~ +-30, roll ~ +-20), moving light,
    cluttered background drifting with the camera, varying head placement and sensor noise."""
    t = np.arange(n, dtype=np.float64) / max(n, 1)
    ph = rng.uniform(0, 2 * math.pi, 12)
    tau = 2 * math.pi * t

    def wave(freq: float, wobble: float, p1: int, p2: int) -> np.ndarray:
        # A sine with a wobbling but monotonic phase (|wobble| * 3 < freq): smooth, irregular,
        # and it still reaches both extremes once per cycle, so the range is always covered.
        return np.sin(freq * tau + ph[p1] + wobble * np.sin(3 * tau + ph[p2]))

    yaw = _u(rng, 66, 72) * wave(1, 0.15, 0, 1)
    pitch = _u(rng, 24, 30) * wave(2, 0.5, 2, 3)
    roll = _u(rng, 15, 20) * wave(1, 0.25, 4, 5)
    lights = _video_lights(rng, tau, ph)
    bg_seed = int(rng.integers(2**31))
    top, bottom = rng.uniform(0.15, 0.85, 3), rng.uniform(0.1, 0.8, 3)
    blur, noise = _u(rng, 0.6, 1.5), _u(rng, 1.5, 3.0) / 255.0
    base_z = _u(rng, 335, 375)
    views = []
    for i in range(n):
        drift = (0.15 * math.sin(tau[i] + ph[8]), 0.05 * math.sin(2 * tau[i] + ph[9]))
        bg = Background("cluttered", tuple(top), tuple(bottom), bg_seed, drift, blur)
        place = Placement(
            15 * math.sin(tau[i] + ph[10]),
            -15 + 10 * math.sin(2 * tau[i] + ph[11]),
            base_z + 25 * math.sin(tau[i] + ph[6]),
        )
        views.append(View("video", i, yaw[i], pitch[i], roll[i], lights[i], bg, place, noise))
    return views


def _video_lights(rng: np.random.Generator, tau: np.ndarray, ph: np.ndarray) -> list[Lighting]:
    """Light direction sweeping around the face, colour and intensity drifting over the clip."""
    az0, swing = math.radians(_u(rng, -40, 40)), math.radians(_u(rng, 30, 60))
    tint = _LIGHT_TINTS[rng.integers(len(_LIGHT_TINTS))]
    gain, ambient = _u(rng, 0.75, 1.15), _u(rng, 0.22, 0.4)
    out = []
    for tt in tau:
        az = az0 + swing * math.sin(tt + ph[6])
        el = math.radians(25 + 15 * math.sin(2 * tt + ph[7]))
        direction = (math.sin(az) * math.cos(el), -math.sin(el), -math.cos(az) * math.cos(el))
        mix = 0.5 + 0.5 * math.sin(tt + ph[4])
        color = tuple(float(c) for c in (1 - mix) * tint + mix * np.ones(3))
        k = gain * (1 + 0.15 * math.sin(3 * tt + ph[5]))
        out.append(Lighting(direction, color, ambient * k, 0.8 * k))
    return out


def render_view(
    identity: Identity, view: View, image_px: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a view, with sensor noise and detector-like landmark noise from ``rng``."""
    rgb, lm, box = render_face(
        identity,
        view.yaw,
        view.pitch,
        view.roll,
        view.lighting,
        view.background,
        image_px,
        placement=view.placement,
        landmark_rng=rng,
    )
    if view.noise > 0:
        noise = rng.standard_normal(rgb.shape, dtype=np.float32)
        noise *= np.float32(view.noise * 255.0)
        noise += rgb
        noise += np.float32(0.5)
        rgb = np.clip(noise, 0, 255).astype(np.uint8)
    return rgb, lm, box
