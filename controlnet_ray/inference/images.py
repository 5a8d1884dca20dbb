"""Image files and pictures: reading and writing RGB images, the model's input/output range,
and captioned tiles laid out in a grid (evaluate and generate's PNGs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from controlnet_ray.inference.errors import InferenceError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file; InferenceError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)  # works for non-ASCII paths, unlike cv2.imread
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise InferenceError(f"{path}: not a readable image (corrupt, empty or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_output_path(path: str | Path, flag: str = "--out") -> Path:
    """The output file's folder must exist: outputs never create folders (typos stay visible)."""
    path = Path(path)
    if path.is_dir():
        raise InferenceError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise InferenceError(
            f"{flag} {path}: folder {path.parent} does not exist (create it first; outputs "
            "never create folders)"
        )
    return path


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Encode by suffix (png, jpg, webp, bmp) and write; InferenceError for other suffixes."""
    path = check_output_path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise InferenceError(f"--out {path}: unsupported image type {suffix or '(none)'}; use .png")
    ok, buf = cv2.imencode(suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InferenceError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())
    return path


def to_model_input(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] (the shards' normalisation)."""
    return (rgb.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def to_rgb8(chw: np.ndarray) -> np.ndarray:
    """Model output float [3, H, W] in [-1, 1] -> RGB uint8 [H, W, 3] (overshoot clipped)."""
    x = (np.asarray(chw, np.float32).transpose(1, 2, 0) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension), sorted; InferenceError when none."""
    folder = Path(folder)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise InferenceError(f"--image {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return files


def label_tile(rgb: np.ndarray, text: str, min_size: int = 96) -> np.ndarray:
    """A tile upscaled to at least ``min_size`` px with a one-line caption strip below it."""
    scale = max(1, math.ceil(min_size / rgb.shape[0]))
    tile = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1) if scale > 1 else rgb
    strip = np.full((14, tile.shape[1], 3), 255, np.uint8)
    font_scale = 0.32 if tile.shape[1] < 140 else 0.4
    cv2.putText(
        strip, text, (2, 10), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA
    )
    return np.concatenate([tile, strip], axis=0)


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tiles (equal ``[H, W, 3]`` uint8 shapes) in rows with a white border and gaps; short rows
    end in white. The tiling is ``reporting.image_grid``'s; this only converts to and from
    numpy, so the PNG grids and TensorBoard's are laid out by one function."""
    import torch

    from controlnet_ray.reporting import image_grid

    chw = [[torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1) for t in r] for r in rows]
    return image_grid(chw, pad, fill=255).permute(1, 2, 0).contiguous().numpy()
