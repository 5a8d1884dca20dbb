"""Tiny datasets in the original on-disk layout, for tests.

``make_legacy_fixture`` draws a face-like picture per image (skin ellipse, dark eyes, nose dot,
mouth line) exactly where the 5 landmarks project for a known head pose, writes the JPEGs under
``repo_root/train/datas/{face,video}`` like the original repository, and writes the metadata with
``controlnet_ray.data.layout.write_legacy_dataset`` (Windows paths, string frame indices, empty
``landmarks_3d_original`` in the video file). Defaults include a non-ASCII name and a name with
a space.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from controlnet_ray.data import geometry
from controlnet_ray.data.layout import ImageRecord, write_legacy_dataset

DEFAULT_PERSONS = ("张伟", "Anna Li", "bob", "carol", "dave")
DATA_REL = "train/datas/file"
# Nose-origin head model (the legacy template); eyes 72 units apart.
_HEAD = geometry.LEGACY_TEMPLATE_3D


@dataclass
class LegacyFixture:
    """Where things were written and the ground truth used to draw them."""

    repo_root: Path
    data_dir: Path
    fronts: list[ImageRecord]
    videos: list[ImageRecord]
    true_poses: dict[str, np.ndarray] = field(default_factory=dict)  # image_relpath -> ypr

    def image(self, relpath: str) -> Path:
        return self.repo_root / relpath

    def load_json(self, role: str) -> dict:
        with open(self.data_dir / f"{role}_metadata.json", encoding="utf-8") as f:
            return json.load(f)

    def save_json(self, role: str, doc: dict) -> None:
        with open(self.data_dir / f"{role}_metadata.json", "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)


def project_landmarks(
    ypr: Sequence[float], size: tuple[int, int], eye_px: float, center_px: Sequence[float]
) -> np.ndarray:
    """[5,2] landmarks of the template at pose ``ypr`` (degrees), eyes ~eye_px apart."""
    w, h = size
    depth = w * 72.0 / eye_px
    rot = geometry.rotation_from_ypr(*ypr)
    # put the nose (origin) on the ray through center_px at that depth
    trans = np.array(
        [(center_px[0] - w / 2) * depth / w, (center_px[1] - h / 2) * depth / w, depth]
    )
    return geometry.project(geometry.head_to_camera(_HEAD, rot, trans), w, h)


def draw_face(
    size: tuple[int, int], landmarks: np.ndarray, tone: tuple[int, int, int], seed: int
) -> np.ndarray:
    """RGB uint8 picture with face features drawn at the landmarks."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 40, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
    lm = np.asarray(landmarks, np.float64)
    eye_d = float(np.linalg.norm(lm[1] - lm[0]))
    center = lm.mean(axis=0)
    axes = (int(max(eye_d * 0.95, 3)), int(max(eye_d * 1.25, 4)))
    cv2.ellipse(img, (int(center[0]), int(center[1] - eye_d * 0.1)), axes, 0, 0, 360, tone, -1)
    r = max(1, int(round(eye_d * 0.12)))
    for k in (0, 1):
        cv2.circle(img, tuple(int(v) for v in lm[k]), r, (20, 20, 30), -1)
    cv2.circle(img, tuple(int(v) for v in lm[2]), r, (150, 80, 70), -1)
    cv2.line(img, tuple(int(v) for v in lm[3]), tuple(int(v) for v in lm[4]), (120, 30, 40), r)
    return img


def _box(landmarks: np.ndarray, size: tuple[int, int]) -> list[float]:
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    pad = (hi - lo) * 0.6
    x1, y1 = np.maximum(lo - pad, 0)
    x2, y2 = np.minimum(hi + pad, [size[0] - 1, size[1] - 1])
    return [float(x1), float(y1), float(x2), float(y2)]


def _save_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="JPEG", quality=quality)


def _person_record(
    root: Path, name: str, relpath: str, ypr: np.ndarray, size: tuple[int, int], rng, tone, q: int
) -> ImageRecord:
    w, h = size
    center = (w / 2 + rng.normal(0, w * 0.02), h / 2 + rng.normal(0, h * 0.02))
    lm = project_landmarks(ypr, size, eye_px=0.3 * w, center_px=center)
    _save_jpeg(root / relpath, draw_face(size, lm, tone, int(rng.integers(1 << 30))), q)
    lm_noisy = lm + rng.normal(0, 0.3, lm.shape)
    return ImageRecord(name, relpath, (w, h), _box(lm, size), lm_noisy.astype(np.float32))


def make_legacy_fixture(
    repo_root: str | Path,
    persons: Sequence[str] = DEFAULT_PERSONS,
    frames_per_person: int = 4,
    size: tuple[int, int] = (96, 96),
    seed: int = 0,
    no_video: Sequence[str] = (),
    quality: int = 90,
    data_rel: str = DATA_REL,
) -> LegacyFixture:
    """One front photo + ``frames_per_person`` video frames per person (none for ``no_video``).

    Fronts are within ~3 degrees of frontal; video yaw sweeps -45..45 degrees with some pitch
    and roll, so front->video pose distances fall inside the original's 5..90 degree rule.
    """
    root = Path(repo_root)
    rng = np.random.default_rng(seed)
    fronts, videos, truth = [], [], {}
    for p, name in enumerate(persons):
        tone = tuple(int(v) for v in rng.integers(140, 230, 3))
        ypr = rng.normal(0, 1.5, 3)
        rel = f"train/datas/face/{name}.jpg"
        fronts.append(_person_record(root, name, rel, ypr, size, rng, tone, quality))
        truth[rel] = ypr
        if name in no_video:
            continue
        for k, yaw in enumerate(np.linspace(-45, 45, frames_per_person)):
            ypr = np.array([yaw + rng.normal(0, 2), rng.normal(0, 8), rng.normal(0, 5)])
            frame = 10 * k + p
            rel = f"train/datas/video/{name}/{name}frame_{frame:06d}.jpg"
            videos.append(_person_record(root, name, rel, ypr, size, rng, tone, quality))
            truth[rel] = ypr
    data_dir = write_legacy_dataset(root / data_rel, fronts, videos, root)
    return LegacyFixture(root, data_dir, fronts, videos, truth)


def corrupt_jpeg(path: Path) -> None:
    """Truncate a JPEG to half its bytes (PIL refuses it; OpenCV would half-decode it)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
