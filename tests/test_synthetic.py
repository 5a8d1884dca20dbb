"""The embedded synthetic dataset: determinism, geometry/sign conventions, identities, layout,
cache. Small renders only (64-160 px, a handful of identities): the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from controlnet_ray.data import synthetic as syn
from controlnet_ray.data.synthetic import (
    Background,
    Lighting,
    SyntheticSpec,
    ensure_synthetic_dataset,
    make_identity,
    render_dataset,
    render_face,
)
from controlnet_ray.data.synthetic import dataset as syn_dataset
from controlnet_ray.data.synthetic.render import _render

TINY = SyntheticSpec(num_identities=2, frames_per_identity=3, seed=0, image_px=64)
GREEN = Background("plain", (0.0, 1.0, 0.0), (0.0, 1.0, 0.0))  # never a skin/hair colour
EVEN = Lighting((0.0, -0.3, -1.0), (1.0, 1.0, 1.0), 0.55, 0.55)
EYES, NOSE = (0, 1), 2


def identity(seed: int) -> syn.Identity:
    return make_identity(np.random.default_rng(seed))


def render(ident: syn.Identity, yaw: float, pitch: float = 0.0, roll: float = 0.0, px: int = 160):
    """(rgb float 0..1, head coverage, landmarks) on a green background under even light."""
    rgb, cover, lm, _ = _render(
        ident, yaw, pitch, roll, EVEN, GREEN, px, syn.Placement(0.0, -15.0, 350.0)
    )
    return rgb.astype(np.float64) / 255.0, cover, lm


def at(img: np.ndarray, point: np.ndarray) -> np.ndarray:
    x, y = np.round(point).astype(int)
    return img[y, x]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------ determinism


def test_render_is_deterministic_per_seed() -> None:
    a = render_face(identity(7), 30.0, -10.0, 5.0)
    b = render_face(identity(7), 30.0, -10.0, 5.0)
    c = render_face(identity(8), 30.0, -10.0, 5.0)
    assert a[0].tobytes() == b[0].tobytes()
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].tobytes() != c[0].tobytes()


def test_dataset_bytes_depend_on_seed_only(tmp_path: Path) -> None:
    render_dataset(tmp_path / "a", TINY)
    render_dataset(tmp_path / "b", TINY)
    render_dataset(tmp_path / "c", SyntheticSpec(2, 3, seed=1, image_px=64))
    a, b, c = (tree_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys()
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert len(jpgs) == 2 * (1 + 3)
    assert all(a[k] != c[k] for k in jpgs)


def test_worker_count_does_not_change_output(tmp_path: Path) -> None:
    render_dataset(tmp_path / "one", TINY, num_workers=1)
    render_dataset(tmp_path / "two", TINY, num_workers=2)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


# -------------------------------------------------------------------- geometry / conventions


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (-25, 10, -10), (25, -15, 12)])
def test_landmarks_lie_on_the_rendered_face(seed: int, yaw: float, pitch: float, roll: float):
    ident = identity(seed)
    rgb, cover, lm = render(ident, yaw, pitch, roll)
    for point in lm:
        assert at(cover, point) > 0.99, f"landmark {point} is off the head"
        px = at(rgb, point)
        assert np.abs(px - [0.0, 1.0, 0.0]).max() > 0.3, "landmark pixel shows the background"
    nose = at(rgb, lm[NOSE])
    assert nose[0] > nose[2] and nose[0] > 0.2, f"nose pixel {nose} is not skin-like"
    for eye in EYES:  # the pupil is painted where the eye landmark projects (~1-2 px wide)
        x, y = np.round(lm[eye]).astype(int)
        darkest = rgb[y - 1 : y + 2, x - 1 : x + 2].mean(-1).min()
        assert darkest < 0.5 * nose.mean(), f"eye landmark {eye} is not on a pupil"


def test_sign_conventions_in_landmarks_and_pixels() -> None:
    ident = identity(3)
    _, _, front = render(ident, 0.0)
    rgb_pos, _, yaw_pos = render(ident, 40.0)
    rgb_neg, _, yaw_neg = render(ident, -40.0)
    _, _, up = render(ident, 0.0, pitch=20.0)
    _, _, rolled = render(ident, 0.0, roll=15.0)

    def eye_mid(lm: np.ndarray) -> np.ndarray:
        return lm[list(EYES)].mean(0)

    assert yaw_pos[NOSE, 0] > eye_mid(yaw_pos)[0] + 3  # yaw > 0: nose to the image right
    assert yaw_neg[NOSE, 0] < eye_mid(yaw_neg)[0] - 3
    # pitch > 0 lifts the nose: it gets closer to the eye line (image y grows downwards)
    assert up[NOSE, 1] - eye_mid(up)[1] < front[NOSE, 1] - eye_mid(front)[1] - 3
    assert rolled[1, 1] < rolled[0, 1] - 3  # roll > 0: counter-clockwise, right eye higher
    assert front[0, 0] < front[1, 0] and front[3, 0] < front[4, 0]  # InsightFace order
    # The pixels agree: turning to the image right (yaw > 0) takes the image-right eye away
    # from the camera, so the eye whites shown are mostly the image-left (near) eye's.
    for rgb, lm, sign in ((rgb_pos, yaw_pos, 1), (rgb_neg, yaw_neg, -1)):
        white = (rgb.min(-1) > 0.75) & (rgb.max(-1) - rgb.min(-1) < 0.12)
        offset = np.nonzero(white)[1] - eye_mid(lm)[0]
        assert sign * ((offset < 0).sum() - (offset > 0).sum()) > 5


def test_far_side_is_occluded_at_large_yaw() -> None:
    """At yaw 70 the image-right (far) eye is hidden: z-buffering, not a painted flat face."""
    ident = identity(5)
    rgb, cover, lm = render(ident, 70.0)
    _, _, lm0 = render(ident, 0.0)
    near_eye, far_eye = at(rgb, lm[0]), at(rgb, lm[1])
    assert near_eye.mean() < 0.3  # pupil visible
    assert far_eye.mean() > near_eye.mean() + 0.1  # skin/nose in front of the far pupil
    assert np.ptp(lm[:, 0]) < 0.6 * np.ptp(lm0[:, 0])  # strongly foreshortened


def test_box_bounds_the_head() -> None:
    ident = identity(1)
    rgb, lm, box = render_face(ident, 0.0, 0.0, 0.0, EVEN, GREEN, 160)
    x1, y1, x2, y2 = box
    assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 160
    assert (lm[:, 0] > x1).all() and (lm[:, 0] < x2).all()
    assert (lm[:, 1] > y1).all() and (lm[:, 1] < y2).all()
    assert 40 < x2 - x1 < 130 and 60 < y2 - y1 < 150  # a head, not the whole frame


def test_identities_differ_at_the_same_pose() -> None:
    images, shapes = [], []
    for seed in range(4):
        ident = identity(seed)
        rgb, cover, _ = render(ident, 20.0, 5.0, 0.0)
        images.append((rgb, cover))
        shapes.append(ident.landmarks_3d)
    for i in range(4):
        for j in range(i + 1, 4):
            (a, ca), (b, cb) = images[i], images[j]
            face = (ca > 0.5) & (cb > 0.5)
            assert np.abs(a - b)[face].mean() > 0.04, f"identities {i} and {j} look alike"
            assert np.abs(shapes[i] - shapes[j]).max() > 1.0  # per-person 3D geometry


def test_render_speed_is_reasonable() -> None:
    """Loose guard (CPU time, 6x the ~10 ms target) against accidental slow paths."""
    ident = identity(0)
    render_face(ident, 0.0, 0.0, 0.0)
    start = time.process_time()
    for yaw in range(-60, 61, 20):
        render_face(ident, float(yaw), 10.0, -5.0)
    per_image = (time.process_time() - start) / 7
    assert per_image < 0.06, f"{per_image * 1000:.0f} ms per 160 px image"


# ---------------------------------------------------------------------------- views / layout


def test_views_cover_the_pose_ranges() -> None:
    _, view_rng, _ = syn.identity_rngs(0, 0)
    front = syn.front_view(view_rng)
    video = syn.video_views(view_rng, 24)
    assert abs(front.yaw) <= 4 and abs(front.pitch) <= 4 and abs(front.roll) <= 2
    assert front.background.kind == "plain" and front.noise == 0
    yaw = np.array([v.yaw for v in video])
    pitch = np.array([v.pitch for v in video])
    roll = np.array([v.roll for v in video])
    assert yaw.min() < -50 and yaw.max() > 50 and np.abs(yaw).max() <= 72
    assert np.abs(pitch).max() > 15 and np.abs(pitch).max() <= 30
    assert np.abs(roll).max() > 8 and np.abs(roll).max() <= 20
    assert np.abs(np.diff(yaw)).max() < 25  # a smooth trajectory, not random poses
    assert len({v.background.drift for v in video}) > 1 and len({v.lighting for v in video}) > 1
    assert all(v.background.kind == "cluttered" for v in video)


def test_layout_is_readable_and_matches_ground_truth(tmp_path: Path) -> None:
    from controlnet_ray.data import layout

    spec = SyntheticSpec(num_identities=6, frames_per_identity=2, seed=0, image_px=64)
    data_dir = render_dataset(tmp_path, spec)
    assert data_dir == tmp_path / "train" / "datas" / "file"
    ds = layout.read_legacy_dataset(data_dir)
    names = {e.person_name for e in ds.entries}
    assert {"合成_0003", "synth 0005", "synth_0000"} <= names and len(names) == 6
    assert (tmp_path / "train/datas/face/合成_0003.jpg").is_file()
    assert (tmp_path / "train/datas/video/synth 0005/synth 0005frame_000001.jpg").is_file()
    gt = json.loads((tmp_path / "ground_truth.json").read_text(encoding="utf-8"))
    assert len(gt["images"]) == len(ds.entries) == 6 * 3
    assert set(gt["persons"]) == names
    for entry, truth in zip(ds.entries, gt["images"], strict=True):
        assert entry.image_path.replace("\\", "/") == truth["image_relpath"]
        assert entry.role == truth["role"] and entry.person_name == truth["person_name"]
        img = cv2.imdecode(np.fromfile(entry.resolved_path, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (64, 64, 3) and entry.image_size == (64, 64)
        np.testing.assert_allclose(entry.landmarks_2d, truth["landmarks_2d"], atol=1e-3)
    assert [e.role for e in ds.entries] == ["front"] * 6 + ["video"] * 12
    shape = np.array(gt["persons"]["synth_0000"]["landmarks_3d"])
    assert shape.shape == (5, 3) and shape[0, 0] < 0 < shape[1, 0]


# ------------------------------------------------------------------------------------ cache


def test_cache_renders_once_and_reuses(tmp_path: Path, monkeypatch, capsys) -> None:
    calls: list[Path] = []
    real = syn.render_dataset

    def counting(root: Path, spec: SyntheticSpec, num_workers: int = 1) -> Path:
        calls.append(root)
        time.sleep(0.2)  # widen the race window for the concurrent caller
        return real(root, spec, num_workers)

    monkeypatch.setattr(syn_dataset, "render_dataset", counting)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_synthetic_dataset(tmp_path, TINY)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]
    data_dir = results[0]
    assert data_dir.parent.parent.parent.name == TINY.digest()
    marker = data_dir / "front_metadata.json"
    mtime = marker.stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path, TINY) == data_dir
    assert len(calls) == 1 and marker.stat().st_mtime_ns == mtime
    out = capsys.readouterr().out
    assert "generating synthetic dataset (2 identities x 3 frames" in out and "reusing" in out
    assert not list((tmp_path / "synthetic").glob(".*-*"))  # no temp dirs left behind
    other = ensure_synthetic_dataset(tmp_path, SyntheticSpec(2, 3, seed=1, image_px=64))
    assert other != data_dir and len(calls) == 2


def test_failed_render_leaves_no_cache_entry(tmp_path: Path, monkeypatch) -> None:
    def broken(root: Path, spec: SyntheticSpec, num_workers: int = 1) -> Path:
        (root / "partial.txt").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(syn_dataset, "render_dataset", broken)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_synthetic_dataset(tmp_path, TINY)
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [f"{TINY.digest()}.lock"]


def test_preview_writes_a_contact_sheet(tmp_path: Path) -> None:
    from controlnet_ray.data import preview

    out = tmp_path / "sheet.png"
    preview.main(["--out", str(out), "--identities", "2", "--frames", "3", "--image_px", "64"])
    sheet = cv2.imread(str(out))
    rows, cols = 2, 1 + 3
    assert sheet.shape[0] == rows * (64 + preview.LABEL_PX) + (rows - 1) * 6
    assert sheet.shape[1] == cols * 64 + (cols - 1) * 4
