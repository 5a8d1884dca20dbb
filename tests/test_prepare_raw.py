"""prepare_raw: raw photos/videos -> original layout; detectors and their conversions.

Real photos come from installed packages (scikit-image's astronaut, InsightFace's t1.jpg group
photo and aligned Tom Hanks crop); the video is written here with OpenCV from the astronaut,
rotated frame by frame so its frames have different head rolls.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from controlnet_ray import prepare_raw
from controlnet_ray.data import detect
from controlnet_ray.data.detect import DetectedFace, DetectorError
from controlnet_ray.data.geometry import ARCFACE_TEMPLATE_112
from controlnet_ray.data.layout import read_legacy_dataset
from tests.inference_fixtures import cli_args, insightface_image, needs_dlib, write_rgb

ROLLS = (-20, -10, 0, 10, 20, 15)  # one frame each; every_k=2 keeps -20, 0, 20


def _astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def _write_video(path: Path, rgb: np.ndarray, rolls=ROLLS) -> Path:
    h, w = rgb.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    assert writer.isOpened()
    for roll in rolls:
        m = cv2.getRotationMatrix2D((w / 2, h / 3), roll, 1.0)
        writer.write(cv2.cvtColor(cv2.warpAffine(rgb, m, (w, h)), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photos/ (astronaut, t1 group photo, a face-less image, a corrupt file) and videos/."""
    base = tmp_path_factory.mktemp("raw")
    photos, videos = base / "photos", base / "videos"
    photos.mkdir()
    videos.mkdir()
    write_rgb(photos / "astronaut.jpg", _astronaut())
    (photos / "group.jpg").write_bytes(insightface_image("t1.jpg").read_bytes())
    rng = np.random.default_rng(0)
    write_rgb(
        photos / "noface.png",
        cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), np.uint8), (9, 9), 3),
    )
    (photos / "corrupt.jpg").write_bytes(b"not a jpeg")
    _write_video(videos / "astronaut.avi", _astronaut())
    return base


class StubDetector:
    """One face at template landmarks in every image but the 160x120 face-less one (no dlib)."""

    name = "stub"

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        h, w = rgb.shape[:2]
        if (w, h) == (160, 120):
            return []
        lm = ARCFACE_TEMPLATE_112 * (min(w, h) / 112.0)
        return [DetectedFace(np.array([0, 0, w - 1, h - 1], float), lm, 0.9)]


def _out(base: Path, name: str) -> Path:
    return base / name / "train" / "datas" / "file"


def test_layout_and_failures_with_a_stub_detector(raw, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(detect, "build_detector", lambda *a, **k: StubDetector())
    out = _out(tmp_path, "stub")
    argv = ["--photos", str(raw / "photos"), "--videos", str(raw / "videos"), "--out", str(out)]
    assert prepare_raw.main([*argv, "--every_k", "2"]) == 0
    root = out.parents[2]
    assert (root / "train/datas/face/astronaut.jpg").is_file()
    frames = sorted(p.name for p in (root / "train/datas/video/astronaut").iterdir())
    assert frames == [f"astronautframe_{i:06d}.jpg" for i in (0, 2, 4)]
    failures = json.loads((out / "failures.json").read_text())
    failed = {Path(f["file"]).name: f["reason"] for f in failures["photos"]}
    assert set(failed) == {"noface.png", "corrupt.jpg"}
    assert (
        failed["noface.png"] == "no face found" and "not a readable image" in failed["corrupt.jpg"]
    )
    ds = read_legacy_dataset(out)
    assert sorted({e.person_name for e in ds.entries}) == ["astronaut", "group"]
    assert ds.roles().count("video") == 3
    text = capsys.readouterr().out
    assert "photos: 2 of 4 with a face (2 failed)" in text
    assert "1 with photo and video, 1 photo only" in text


def test_refuses_existing_dataset_and_bad_out(raw, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(detect, "build_detector", lambda *a, **k: StubDetector())
    out = _out(tmp_path, "again")
    argv = ["--photos", str(raw / "photos"), "--out", str(out)]
    assert prepare_raw.main(argv) == 0
    assert prepare_raw.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert prepare_raw.main([*argv, "--overwrite"]) == 0
    assert prepare_raw.main(["--photos", str(raw / "photos"), "--out", str(tmp_path / "x")]) == 2
    assert "train/datas/file" in capsys.readouterr().err


def test_no_face_anywhere_is_an_error(raw, tmp_path, monkeypatch, capsys):
    class Blind(StubDetector):
        def detect(self, rgb):
            return []

    monkeypatch.setattr(detect, "build_detector", lambda *a, **k: Blind())
    out = _out(tmp_path, "blind")
    assert prepare_raw.main(["--photos", str(raw / "photos"), "--out", str(out)]) == 2
    assert "no face found in any photo" in capsys.readouterr().err
    assert (out / "failures.json").is_file() and not (out / "front_metadata.json").exists()


def test_insightface_without_models_names_the_files(raw, tmp_path, capsys):
    empty = tmp_path / "models"
    empty.mkdir()
    out = str(_out(tmp_path, "if"))
    photos = ["--photos", str(raw / "photos"), "--out", out]
    assert (
        prepare_raw.main([*photos, "--detector", "insightface", "--face_models", str(empty)]) == 2
    )
    err = capsys.readouterr().err
    assert "det_10g.onnx" in err and str(empty) in err and "Nothing is downloaded" in err
    assert prepare_raw.main([*photos, "--detector", "insightface"]) == 2
    assert "--face_models" in capsys.readouterr().err


def test_auto_detector_without_any_option_says_what_to_install(monkeypatch):
    monkeypatch.setattr(detect, "dlib_available", lambda: False)
    with pytest.raises(DetectorError, match="dlib-bin face-recognition-models"):
        detect.build_detector("auto")


def test_largest_face_and_dlib_conversion_geometry():
    small = DetectedFace(np.array([0, 0, 10, 10.0]), np.zeros((5, 2)), 0.9)
    big = DetectedFace(np.array([0, 0, 30, 20.0]), np.ones((5, 2)), 0.5)
    assert detect.largest_face([small, big]) is big and detect.largest_face([]) is None
    # dlib's 5 points for a frontal face: eye corners (image-right eye first), nose base.
    pts = np.array([[80, 50], [66, 50], [30, 50], [44, 50], [55, 78]], float)
    five = detect.dlib5_to_insightface(pts, 112, 112)
    np.testing.assert_allclose(five[:2], [[37, 50], [73, 50]])
    assert five[3, 0] < five[2, 0] < five[4, 0] and five[2, 1] < five[3, 1]  # nose above mouth
    assert abs((five[4, 0] - five[3, 0]) - 0.83 * 36) < 3.0  # the mean face's mouth width


@needs_dlib
def test_dlib_detector_on_an_aligned_crop_matches_the_template():
    from controlnet_ray.inference import read_image

    image = read_image(insightface_image("Tom_Hanks_54745.png"))
    face = detect.largest_face(detect.DlibDetector().detect(image))
    assert face is not None
    err = np.linalg.norm(face.landmarks - ARCFACE_TEMPLATE_112, axis=1)
    assert err[:2].max() < 4.0, err  # eye centres: measured
    # nose tip and mouth corners: projected from a posed 3D face; the 68-point model measures
    # them (this face is turned a little: its nose is 9 px off the template's)
    measured = detect.largest_face(detect.DlibDetector(landmarks=68).detect(image))
    err = np.linalg.norm(face.landmarks - measured.landmarks, axis=1)
    assert err.max() < 6.0, err  # (the mouth is the mean face's: 5 px narrower than his)
    assert "face_recognition_models" not in sys.modules  # its pkg_resources import is avoided


@needs_dlib
@pytest.mark.slow
def test_dlib_end_to_end_then_training_data_loads(raw, tmp_path, capsys):
    from controlnet_ray.config import DataConfig
    from controlnet_ray.data.shards import ensure_shards, read_shard_table

    out = _out(tmp_path, "dlib")
    argv = ["--photos", str(raw / "photos"), "--videos", str(raw / "videos"), "--out", str(out)]
    assert prepare_raw.main([*argv, "--detector", "dlib", "--every_k", "2"]) == 0
    text = capsys.readouterr().out
    assert "group.jpg (6)" in text  # several faces: the largest is kept
    ds = read_legacy_dataset(out)
    assert ds.roles().count("video") == 3
    # The training commands' data path reads it: shards with poses (all persons in train).
    cfg = DataConfig(
        data_dir=str(out),
        image_size=32,
        split_ratios=(1.0, 0.0, 0.0),
        cache_dir=str(tmp_path / "cache"),
        num_workers=1,
    )
    rows = read_shard_table(ensure_shards(cfg, num_workers=1), "train").to_pydict()
    video_rolls = [r for r, role in zip(rows["roll"], rows["role"], strict=True) if role == "video"]
    assert max(video_rolls) - min(video_rolls) > 25  # the video's -20..20 deg rotation


@needs_dlib
def test_subprocess_smoke(tmp_path):
    photos, videos = tmp_path / "p", tmp_path / "v"
    photos.mkdir()
    videos.mkdir()
    write_rgb(photos / "astro.jpg", _astronaut())
    _write_video(videos / "astro.avi", _astronaut(), rolls=(0, 10))
    out = _out(tmp_path, "sp")
    argv = cli_args(photos=photos, videos=videos, out=out, every_k=1)
    cmd = [sys.executable, "-m", "controlnet_ray.prepare_raw", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 with photo and video" in proc.stdout
    assert len(read_legacy_dataset(out).entries) == 3


# --------------------------------------------------------------------------- InsightFace path

_KPS = ((-1.0, -0.5), (1.0, -0.5), (0.0, 0.1), (-0.7, 0.8), (0.7, 0.8))  # stride units


def _fake_scrfd(path: Path) -> Path:
    """An ONNX file shaped like InsightFace's SCRFD (9 outputs: scores/boxes/kps at strides
    8/16/32, 2 anchors) that "detects" pure red squares, so the real insightface post-processing
    runs through our wrapper. Red, not green: it also checks the RGB/BGR hand-over."""
    import warnings

    import torch

    class FakeSCRFD(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN201 - [1,3,H,W] RGB, (pixel - 127.5) / 128
            red = x[:, 0:1] - 0.5 * (x[:, 1:2] + x[:, 2:3])
            scores, boxes, kps = [], [], []
            offsets = torch.as_tensor(_KPS, dtype=torch.float32).reshape(1, 10)
            for stride in (8, 16, 32):
                p = torch.nn.functional.avg_pool2d(red, stride, stride)
                s = torch.sigmoid(20 * (p - 1.5)).permute(0, 2, 3, 1).reshape(-1, 1)
                s = s.repeat_interleave(2, dim=0)
                scores.append(s)
                boxes.append(s * 0 + 2.0 + torch.zeros(1, 4))
                kps.append(s * 0 + offsets)
            return (*scores, *boxes, *kps)

    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    axes = {"input.1": {2: "height", 3: "width"}} | {n: {0: f"n_{n}"} for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notes
        torch.onnx.export(
            FakeSCRFD(),
            (torch.zeros(1, 3, 64, 64),),
            str(path),
            dynamo=False,
            input_names=["input.1"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=17,
        )
    return path


@pytest.fixture(scope="module")
def face_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model-pack folder laid out like ~/.insightface/models with buffalo_l inside."""
    root = tmp_path_factory.mktemp("models")
    (root / "buffalo_l").mkdir()
    _fake_scrfd(root / "buffalo_l" / "det_10g.onnx")
    return root


def _red_square(color=(255, 0, 0)) -> np.ndarray:
    img = np.full((240, 320, 3), 90, np.uint8)
    img[80:176, 100:196] = color
    return img


def test_insightface_detector_wiring(face_models):
    det = detect.build_detector("auto", face_models=face_models)
    assert isinstance(det, detect.InsightFaceDetector)
    assert det.path == face_models / "buffalo_l" / "det_10g.onnx"
    face = detect.largest_face(det.detect(_red_square()))
    assert face is not None
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    assert 100 <= cx <= 196 and 80 <= cy <= 176  # original-image coordinates
    lm = face.landmarks
    assert lm.shape == (5, 2) and lm[0, 0] < lm[2, 0] < lm[1, 0] and lm[0, 1] < lm[3, 1]
    assert det.detect(_red_square(color=(0, 0, 255))) == []  # blue is not red: RGB order kept


def test_prepare_raw_with_insightface_models(face_models, tmp_path, capsys):
    photos, videos = tmp_path / "photos", tmp_path / "videos"
    photos.mkdir()
    videos.mkdir()
    write_rgb(photos / "square.png", _red_square())
    write_rgb(photos / "plain.png", np.full((240, 320, 3), 90, np.uint8))
    _write_video(videos / "square.avi", _red_square(), rolls=(0, 5))
    out = _out(tmp_path, "if")
    argv = cli_args(
        photos=photos, videos=videos, out=out, detector="insightface", face_models=face_models
    )
    assert prepare_raw.main([*argv, "--every_k", "1"]) == 0
    assert "detector: insightface" in capsys.readouterr().out
    entries = read_legacy_dataset(out).entries
    assert [(e.person_name, e.role) for e in entries] == [("square", "front")] + [
        ("square", "video")
    ] * 2
    failures = json.loads((out / "failures.json").read_text())
    assert [Path(f["file"]).name for f in failures["photos"]] == ["plain.png"]
