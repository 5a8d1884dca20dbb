"""Contact sheet of the embedded synthetic dataset, to eyeball it before training on it.

``python -m controlnet_ray.data.preview --out contact_sheet.png --identities 6 --frames 8``
renders one row per identity: the ID photo, then the video frames sorted by yaw, each tile
labelled with its true yaw/pitch/roll (and the 5 landmarks drawn with ``--landmarks``).
Rendering is exactly the dataset's (same seeds), so what you see is what training gets.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from controlnet_ray.data.synthetic import (
    front_view,
    identity_rngs,
    make_identity,
    person_name,
    render_face,
    render_view,
    video_views,
)

# One face at each signed axis: the picture of the pose convention in the README.
CONVENTION_POSES = [
    (0, 0, 0),
    (40, 0, 0),
    (-40, 0, 0),
    (0, 20, 0),
    (0, -20, 0),
    (0, 0, 15),
    (0, 0, -15),
]

LABEL_PX = 14
LANDMARK_COLORS = [(255, 0, 0), (0, 160, 255), (0, 220, 0), (255, 0, 255), (255, 220, 0)]


def tile(rgb: np.ndarray, text: str, landmarks: np.ndarray | None = None) -> np.ndarray:
    """Image plus a label strip underneath (small cv2 text, readable at 1:1); the one tile of
    every contact sheet (this preview, preparation's pose extremes)."""
    img = rgb.copy()
    if landmarks is not None:
        for (x, y), color in zip(landmarks, LANDMARK_COLORS, strict=True):
            cv2.circle(img, (int(round(x)), int(round(y))), 2, color, -1)
    strip = np.full((LABEL_PX, img.shape[1], 3), 255, dtype=np.uint8)
    scale = img.shape[1] / 160 * 0.33
    cv2.putText(
        strip, text, (2, LABEL_PX - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA
    )
    return np.concatenate([img, strip], axis=0)


def _row(index: int, args: argparse.Namespace) -> np.ndarray:
    """One identity: front photo, then frames sorted by yaw."""
    id_rng, view_rng, noise_rng = identity_rngs(args.seed, index)
    ident = make_identity(id_rng)
    views = [front_view(view_rng), *video_views(view_rng, args.frames)]
    rendered = [(v, *render_view(ident, v, args.image_px, noise_rng)) for v in views]
    front, frames = rendered[0], sorted(rendered[1:], key=lambda r: r[0].yaw)
    tiles = []
    for view, rgb, lm, _ in [front, *frames]:
        tag = "ID " if view.role == "front" else ""
        text = f"{tag}y{view.yaw:+.0f} p{view.pitch:+.0f} r{view.roll:+.0f}"
        tiles.append(tile(rgb, text, lm if args.landmarks else None))
    return join(tiles, axis=1)


def join(parts: list[np.ndarray], axis: int) -> np.ndarray:
    """Tiles side by side (``axis`` 1, 4 px white gaps) or rows stacked (``axis`` 0, 6 px gaps;
    a narrower row is padded white on the right)."""
    if axis == 0:
        width = max(p.shape[1] for p in parts)
        pad = [((0, 0), (0, width - p.shape[1]), (0, 0)) for p in parts]
        parts = [np.pad(p, w, constant_values=255) for p, w in zip(parts, pad, strict=True)]
    shape = list(parts[0].shape)
    shape[axis] = 4 if axis == 1 else 6
    gap = np.full(shape, 255, dtype=np.uint8)
    return np.concatenate([q for part in parts for q in (part, gap)][:-1], axis=axis)


def convention_row(args: argparse.Namespace) -> np.ndarray:
    """One identity at +/- yaw, pitch and roll, landmarks drawn: what each sign means."""
    ident = make_identity(identity_rngs(args.seed, 0)[0])
    tiles = []
    for yaw, pitch, roll in CONVENTION_POSES:
        rgb, lm, _ = render_face(ident, yaw, pitch, roll, image_px=args.image_px)
        tiles.append(tile(rgb, f"yaw{yaw:+d} pitch{pitch:+d} roll{roll:+d}", lm))
    return join(tiles, axis=1)


def build_sheet(args: argparse.Namespace) -> np.ndarray:
    if args.convention:
        return convention_row(args)
    return join([_row(i, args) for i in range(args.identities)], axis=0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("contact_sheet.png"))
    p.add_argument("--identities", type=int, default=6)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_px", type=int, default=160)
    p.add_argument("--landmarks", action="store_true", help="draw the 5 recorded landmarks")
    p.add_argument(
        "--convention",
        action="store_true",
        help="one face at +/- yaw, pitch, roll: the pose convention's picture",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    sheet = build_sheet(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), sheet[..., ::-1])
    count = 1 if args.convention else args.identities
    names = ", ".join(person_name(i, args.identities) for i in range(count))
    print(f"wrote {args.out} ({count} identities: {names}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
