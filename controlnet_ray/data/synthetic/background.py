"""Image backgrounds: the ID photo's plain gradient and the phone video's seeded clutter."""

from __future__ import annotations

import cv2
import numpy as np

from controlnet_ray.data.synthetic.spec import Background


def render_background(bg: Background, image_px: int) -> np.ndarray:
    """Background image float32 [H,W,3] in 0..1 (plain gradient or seeded clutter)."""
    ramp = np.linspace(0.0, 1.0, image_px, dtype=np.float32)[:, None, None]
    img = np.asarray(bg.top, np.float32) * (1 - ramp) + np.asarray(bg.bottom, np.float32) * ramp
    img = np.ascontiguousarray(np.broadcast_to(img, (image_px, image_px, 3)))
    if bg.kind == "cluttered":
        _clutter(img, bg, image_px)
        if bg.blur > 0:
            img = cv2.GaussianBlur(img, (0, 0), bg.blur)
    return img


def _clutter(img: np.ndarray, bg: Background, px: int) -> None:
    """Shelves, frames, windows and blobs, all shifted by the drift (the camera moves)."""
    rng = np.random.default_rng(bg.seed)
    dx, dy = bg.drift[0] * px, bg.drift[1] * px
    for _ in range(int(rng.integers(14, 24))):
        color = tuple(float(c) for c in rng.uniform(0.05, 0.95, 3))
        cx, cy = rng.uniform(-0.4, 1.4) * px + dx, rng.uniform(-0.2, 1.2) * px + dy
        w, h = rng.uniform(0.05, 0.5) * px, rng.uniform(0.05, 0.5) * px
        kind = rng.integers(4)
        p1 = (int(cx - w / 2), int(cy - h / 2))
        p2 = (int(cx + w / 2), int(cy + h / 2))
        if kind == 0:
            cv2.rectangle(img, p1, p2, color, -1)
        elif kind == 1:
            cv2.circle(img, (int(cx), int(cy)), int(w / 2), color, -1)
        elif kind == 2:
            cv2.rectangle(img, p1, p2, color, max(1, int(px / 60)))
        else:
            cv2.line(img, p1, p2, color, max(1, int(rng.uniform(1, px / 25))))
