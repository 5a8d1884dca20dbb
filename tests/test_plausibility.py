"""The plausibility rules (``data/plausibility.py``) calibrated against faces a camera can make.

Rigid rotations (yaw to +-90, pitch and roll to +-45 degrees) of 3D face templates of different
proportions (eye spacing, face length, nose and mouth depth, where the head turns about), seen
by pinhole cameras of focal length 0.5x to 3x the image width, at many sizes and places in the
image, exact and with detector-like noise (up to 3 px), must never be refused; only what no
camera can produce is. The grid is fixed and the sampled settings come from a seeded generator:
every run checks the same faces.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet_ray.config import DataConfig
from controlnet_ray.data.geometry import FLIP, rotation_from_ypr
from controlnet_ray.data.layout import ImageRecord, write_legacy_dataset
from controlnet_ray.data.plausibility import landmark_oddity, landmark_problem
from controlnet_ray.data.shards import prepare_shards
from tests.datasets import draw_face

FOCALS = (0.5, 1.0, 2.0, 3.0)  # focal length over image width
IMAGE_SIZES = ((640, 480), (480, 640), (1280, 720), (256, 256), (96, 96))
NOISE_PX = 3.0  # largest detector error per coordinate
MIN_EYES_PX = 12.0  # frontal inter-ocular distance of the smallest face drawn (a ~25 px box)


@dataclass(frozen=True)
class Template:
    """A head's five landmarks in millimetres (x right, y up, z towards the viewer; origin
    between the eyes) and the point it turns about (neck and jaw: below and behind the eyes)."""

    eye_half: float  # half the inter-ocular distance
    mouth_drop: float  # eyes to mouth corners, downwards
    nose_drop: float
    nose_depth: float  # nose tip in front of the eyes
    mouth_half: float
    mouth_depth: float  # mouth corners in front of the eyes
    pivot: tuple[float, float, float]

    def points(self) -> np.ndarray:
        e, m = self.eye_half, self.mouth_half
        return np.array(
            [
                [-e, 0.0, 0.0],
                [e, 0.0, 0.0],
                [0.0, -self.nose_drop, self.nose_depth],
                [-m, -self.mouth_drop, self.mouth_depth],
                [m, -self.mouth_drop, self.mouth_depth],
            ]
        )


TEMPLATES = {
    "original": Template(36, 43, 13, 42, 25, 0, (0, -20, -90)),  # the legacy PnP template
    "narrow_long": Template(29, 56, 34, 28, 22, 12, (0, -45, -100)),
    "wide_short": Template(37, 38, 22, 20, 28, 6, (0, -15, -85)),
    "flat": Template(32, 46, 28, 12, 25, 2, (0, -30, -80)),
    "deep": Template(31, 50, 30, 38, 21, 20, (0, -35, -110)),
    "child": Template(27, 34, 20, 15, 18, 6, (0, -20, -70)),
}


@dataclass(frozen=True)
class View:
    """One projected face: its pose, camera and landmarks ([5,2] pixels)."""

    template: str
    ypr: tuple[float, float, float]
    focal: float
    size: tuple[int, int]
    landmarks: np.ndarray

    def inside(self) -> bool:
        w, h = self.size
        lm = self.landmarks
        return bool((lm >= 0).all() and (lm[:, 0] <= w).all() and (lm[:, 1] <= h).all())


def project(
    t: Template, ypr: tuple[float, float, float], focal: float, size: tuple[int, int], rng
) -> np.ndarray:
    """[5,2] pixels of ``t`` turned by ``ypr`` about its pivot; the camera distance and the
    face's place in the image are drawn from ``rng`` (frontal eyes 12 px to 35 % of the
    image's smaller side apart, centre within the middle 60 % of the image)."""
    w, h = size
    f = focal * w
    eyes_px = rng.uniform(MIN_EYES_PX, max(MIN_EYES_PX, 0.35 * min(w, h)))
    depth = f * 2 * t.eye_half / eyes_px  # camera to the eyes of the frontal face
    centre = rng.uniform(0.2, 0.8, 2) * (w, h)
    pivot = np.asarray(t.pivot, float)
    offset = np.array([(centre[0] - w / 2) * depth / f, (centre[1] - h / 2) * depth / f, depth])
    turned = (rotation_from_ypr(*ypr) @ (t.points() - pivot).T).T + pivot
    cam = (FLIP @ turned.T).T + offset
    assert (cam[:, 2] > 0).all()  # in front of the camera
    return np.stack([f * cam[:, 0] / cam[:, 2] + w / 2, f * cam[:, 1] / cam[:, 2] + h / 2], 1)


def views(poses, seed: int, noise: float) -> Iterator[View]:
    """Every template x focal length x pose, image size and framing drawn from ``seed``, with
    uniform noise of up to ``noise`` px per coordinate."""
    rng = np.random.default_rng(seed)
    for name, focal, ypr in itertools.product(TEMPLATES, FOCALS, poses):
        size = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        lm = project(TEMPLATES[name], ypr, focal, size, rng)
        lm = lm + rng.uniform(-noise, noise, lm.shape)
        yield View(name, ypr, focal, size, lm)


def grid(yaws, pitches, rolls) -> list[tuple[float, float, float]]:
    return [(float(y), float(p), float(r)) for y, p, r in itertools.product(yaws, pitches, rolls)]


FULL_RANGE = grid(range(-90, 91, 10), range(-45, 46, 15), range(-45, 46, 15))
# The independent set's refused frames: near profile with pitch and roll, eye order reversed.
NEAR_PROFILE = grid([*range(-70, -63), *range(64, 71)], range(-30, 31, 10), range(-20, 21, 10))


def _refused(cases: list[View]) -> list[tuple]:
    """(template, pose, focal, size, why) of every face inside its image that is refused."""
    return [
        (v.template, v.ypr, v.focal, v.size, problem)
        for v in cases
        if v.inside() and (problem := landmark_problem(v.landmarks, v.size))
    ]


@pytest.mark.parametrize("noise", [0.0, NOISE_PX], ids=["exact", "noisy"])
def test_no_rigid_projection_of_a_face_is_refused(noise: float) -> None:
    cases = list(views(FULL_RANGE, seed=0, noise=noise))
    inside = sum(v.inside() for v in cases)
    assert inside > 0.85 * len(cases)  # the filter leaves most faces in
    refused = _refused(cases)
    assert refused == [], f"{len(refused)} of {inside} refused, e.g. {refused[:3]}"


def test_near_profile_faces_with_their_eye_order_reversed_are_only_unusual() -> None:
    """Yaw 64-70 with pitch up to +-30 and roll up to +-20: the eyes' image order reverses for
    some heads, as it does for real ones; such a face is recorded, never refused."""
    cases = [v for v in views(NEAR_PROFILE, seed=1, noise=0.0) if v.inside()]
    assert _refused(cases) == []
    reversed_order = [
        v for v in cases if "order is reversed" in (landmark_oddity(v.landmarks) or "")
    ]
    assert 0 < len(reversed_order) < len(cases) / 2
    assert {v.template for v in reversed_order} >= {"original", "deep"}


def test_a_near_frontal_face_is_not_even_unusual() -> None:
    """The record of unusual faces is not noise: up to 40 degrees of yaw and 30 of pitch, any
    roll, seen by a lens no wider than 1x the image width (a wide lens near the image's edge
    sees the face obliquely, which adds to the pose), nothing is flagged: exact, or noisy on a
    face whose eyes are at least 30 px apart."""
    near = grid(range(-40, 41, 10), range(-30, 31, 15), range(-45, 46, 15))
    checked = 0
    for noise, seed in ((0.0, 2), (NOISE_PX, 3)):
        for v in views(near, seed=seed, noise=noise):
            eyes_px = float(np.linalg.norm(v.landmarks[1] - v.landmarks[0]))
            if not v.inside() or v.focal < 1 or (noise and eyes_px < 30):
                continue
            checked += 1
            assert landmark_oddity(v.landmarks) is None, (v.template, v.ypr, v.focal, v.size)
    assert checked > 6000


def test_a_face_cut_by_the_frame_is_not_refused() -> None:
    """Detectors extrapolate the points of a face the frame cuts: a mouth corner a fifth of the
    image beyond the border is still a face."""
    lm = np.array([[20.0, 40.0], [60.0, 40.0], [40.0, 70.0], [25.0, 110.0], [55.0, 115.0]])
    assert landmark_problem(lm, (100, 96)) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda lm, w: lm + 2 * w, "is far outside the"),
        (lambda lm, w: lm - 1.6 * w, "is far outside the"),
        (lambda lm, w: lm.mean(0) + (lm - lm.mean(0)) * 1e-3, "collapsed onto one point"),
        (lambda lm, w: np.full_like(lm, w / 3), "collapsed onto one point"),
    ],
    ids=["far_right_below", "far_left_above", "shrunk", "one_point"],
)
def test_every_face_moved_far_outside_or_collapsed_is_refused(change, reason: str) -> None:
    """The same faces, made impossible, are refused: the rules are not merely lax."""
    cases = [v for v in views(FULL_RANGE[::7], seed=4, noise=NOISE_PX) if v.inside()]
    for v in cases:
        problem = landmark_problem(change(v.landmarks, max(v.size)), v.size)
        assert problem is not None and reason in problem, (v.template, v.ypr, problem)


def test_eyes_farther_apart_than_the_image_is_large_are_refused() -> None:
    lm = np.array([[-20.0, 50.0], [110.0, 50.0], [45.0, 70.0], [30.0, 90.0], [60.0, 90.0]])
    assert "eyes 130.0 px apart, farther than the 96x96 image" in landmark_problem(lm, (96, 96))


def _drawn(root: Path, person: str, rel: str, ypr: tuple[float, float, float], rng) -> ImageRecord:
    """A picture of ``person``'s template at ``ypr`` (1x focal, 160 px) and its record."""
    size = (160, 160)
    lm = project(TEMPLATES[person], ypr, 1.0, size, rng)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_face(size, lm, (200, 170, 150), 0)).save(root / rel, quality=90)
    return ImageRecord(person, rel, size, [0, 0, 159, 159], lm.astype(np.float32))


def test_a_near_profile_set_in_the_original_layout_is_prepared_without_any_flag(tmp_path):
    """Exact projections of each template near profile with pitch and roll, written as the
    original wrote them: prepared as they are, the reversed ones listed as unusual."""
    rng = np.random.default_rng(5)
    poses = [(-67, 30, -20), (-70, 30, -20), (67, 30, 20), (70, 15, 20), (-30, 10, 5), (30, -9, 0)]
    fronts = [_drawn(tmp_path, p, f"train/datas/face/{p}.jpg", (0, 0, 0), rng) for p in TEMPLATES]
    videos = [
        _drawn(tmp_path, p, f"train/datas/video/{p}/{p}frame_{k:06d}.jpg", ypr, rng)
        for p in TEMPLATES
        for k, ypr in enumerate(poses)
    ]
    data_dir = write_legacy_dataset(tmp_path / "train/datas/file", fronts, videos, tmp_path)
    manifest = prepare_shards(DataConfig(data_dir=data_dir), tmp_path / "shards", num_workers=1)
    assert manifest.skipped_count == 0
    assert manifest.counts["total"]["images"] == len(fronts) + len(videos)
    assert len(manifest.unusual) >= 3
    assert all("order is reversed" in u["reason"] for u in manifest.unusual)
