"""benchmarks/real_clips.py's pieces that need no real media: the face model file, the 68-point
PnP (on a synthetic 3D face: the real one is not shipped), the agreement table, finding and
extracting clips, the photo frame, bad input."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from controlnet_ray.data.geometry import head_to_camera, project, rotation_from_ypr

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def face68(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("face68")


@pytest.fixture()
def agree(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("label_agreement")


@pytest.fixture()
def real_clips(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("real_clips")


def _ellipse(centre: tuple[float, float, float], rx: float, ry: float, n: int) -> np.ndarray:
    """``n`` points from the image-left end (180 deg) over the top and back along the bottom."""
    phi = np.deg2rad(180.0 - 360.0 * np.arange(n) / n)
    zero = np.zeros(n)
    return np.array(centre) + np.stack([rx * np.cos(phi), ry * np.sin(phi), zero], axis=1)


def synthetic_face_68() -> np.ndarray:
    """A rigid, non-planar 68-point face in the head frame (iBUG order, nose tip 30 at the
    origin, y up, z towards the camera, millimetre-like), built from simple curves."""
    a = np.linspace(0.0, np.pi, 17)
    jaw = np.stack([-72 * np.cos(a), 20 - 105 * np.sin(a), -85 + 48 * np.sin(a)], axis=1)
    bx = np.linspace(-62, -13, 5)
    brow = np.stack([bx, 41 + 12 * np.sin(np.linspace(0.3, 2.6, 5)), -50 + 0.5 * (bx + 62)], 1)
    brows = np.concatenate([brow, (brow * [-1, 1, 1])[::-1]])
    bridge = np.stack([np.zeros(4), [34.0, 23, 11, 0], [-24.0, -16, -8, 0]], axis=1)
    nx = np.linspace(-16, 16, 5)
    nostrils = np.stack([nx, -15 + 4 * (nx / 16) ** 2, -11 - 5 * (nx / 16) ** 2], axis=1)
    eyes = np.concatenate([_ellipse((c, 30, -38), 13, 4, 6) for c in (-34, 34)])
    mouth = np.concatenate([_ellipse((0, -38, -14), 29, 10, 12), _ellipse((0, -38, -15), 20, 4, 8)])
    mouth[:, 2] -= 18 * (mouth[:, 0] / 29) ** 2  # corners lie deeper than the lips' middle
    return np.concatenate([jaw, brows, bridge, nostrils, eyes, mouth])


def write_model_txt(face: np.ndarray, path: Path, origin: tuple[float, ...] = (0, 0, 0)) -> Path:
    """``face`` (head frame) as head-pose-estimation's model.txt: its frame is y down, z away
    from the camera, any origin; 68 x, then 68 y, then 68 z, one number a line."""
    raw = face * [1.0, -1.0, -1.0] + np.asarray(origin, np.float64)
    path.write_text("".join(f"{float(v)!r}\n" for v in raw.T.reshape(-1)))
    return path


@pytest.fixture()
def face(face68: ModuleType, tmp_path: Path) -> np.ndarray:
    """The synthetic face, loaded through a model.txt file as the benchmarks load theirs."""
    return face68.load_face_model(write_model_txt(synthetic_face_68(), tmp_path / "model.txt"))


def test_the_face_model_file_is_read_into_the_head_frame(
    face68: ModuleType, tmp_path: Path
) -> None:
    path = write_model_txt(synthetic_face_68(), tmp_path / "m.txt", origin=(1.2, -8.4, -36.9))
    got = face68.load_face_model(path)
    np.testing.assert_allclose(got, synthetic_face_68(), atol=1e-12)
    assert np.array_equal(got[30], np.zeros(3))  # the nose tip is the origin
    assert got[30, 2] > got[36:48, 2].max() and got[17:27, 1].min() > got[48:68, 1].max()
    assert got[36:42, 0].mean() < 0 < got[42:48, 0].mean()  # image-left eye at negative x


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("1\n" * 203, "expected 204 finite numbers .*got 203 numbers, 0 not finite"),
        ("1\n" * 203 + "nan\n", "expected .*got 204 numbers, 1 not finite"),
        ("1\n" * 203 + "x\n", "not a model.txt of numbers"),
    ],
)
def test_a_malformed_face_model_is_refused_naming_the_file(
    face68: ModuleType, tmp_path: Path, text: str, why: str
) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(face68.FaceModelError, match=f"^--face_model {path}: {why}"):
        face68.load_face_model(path)


def test_a_missing_face_model_says_where_to_get_it(face68: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(face68.FaceModelError, match="none.txt: no such file .*head-pose-est"):
        face68.load_face_model(tmp_path / "none.txt")


def _projected(
    face: np.ndarray, ypr: tuple[float, float, float], w: int = 640, h: int = 480
) -> np.ndarray:
    cam = head_to_camera(face, rotation_from_ypr(*ypr), np.array([8, -5, 700.0]))
    return project(cam, w, h)


@pytest.mark.parametrize("ypr", [(0, 0, 0), (35, 12, -8), (-60, -25, 20), (80, 30, 40)])
def test_pnp_68_recovers_the_pose_of_the_projected_face(
    face68: ModuleType, face: np.ndarray, ypr: tuple[float, float, float]
) -> None:
    got = face68.pnp_pose_68(_projected(face, ypr), 640, 480, face)
    np.testing.assert_allclose(got, ypr, atol=0.05)


def test_pnp_68_keeps_the_yaw_sign_under_detector_noise(
    face68: ModuleType, face: np.ndarray
) -> None:
    rng = np.random.default_rng(0)
    for yaw in (-30, -15, 15, 30):
        pts = _projected(face, (yaw, 10, 5)) + rng.normal(0, 1.5, (68, 2))  # ~1.5 % of IOD
        got = face68.pnp_pose_68(pts, 640, 480, face)[0]
        assert np.sign(got) == np.sign(yaw) and abs(got - yaw) < 6


def test_pnp_68_refuses_non_finite_points(face68: ModuleType, face: np.ndarray) -> None:
    pts = _projected(face, (0, 0, 0))
    pts[3, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        face68.pnp_pose_68(pts, 640, 480, face)


def _persons(
    rng: np.random.Generator, mirrored: str | None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Three persons x 30 frames; ``mirrored``'s labels have the wrong sign; p2 never turns."""
    names, ref, labels = [], [], []
    for person, spread in (("p0", 25.0), ("p1", 20.0), ("p2", 2.0)):
        yaw = rng.uniform(-spread, spread, 30)
        label = yaw + rng.normal(0, 1.0, 30)
        names += [person] * 30
        ref.append(yaw)
        labels.append(-label if person == mirrored else label)
    ref, labels = np.concatenate(ref), np.concatenate(labels)
    zeros = np.zeros_like(ref)
    return names, np.stack([labels, zeros, zeros], 1), np.stack([ref, zeros, zeros], 1)


def test_agreeing_labels_meet_the_targets(agree: ModuleType) -> None:
    names, labels, pnp = _persons(np.random.default_rng(1), mirrored=None)
    rows = agree.person_rows(names, labels, pnp, pnp[:, 0] / 100, 10.0, 0.12)
    assert [r.person for r in rows] == ["p0", "p1", "p2", "all"]
    assert rows[-1].pnp.correlation > 0.95 and rows[0].pnp.right_sign is True
    assert rows[2].pnp.right_sign is None  # never clearly turned: not judged
    text = agree.format_table(rows)
    assert "target >= 0.8: met" in text and "right sign for 2 of 3 persons" in text
    assert "WRONG" not in text and "r > 0 for 3 of 3 persons" in text


def test_a_mirrored_person_is_named_and_lowers_the_correlation(agree: ModuleType) -> None:
    names, labels, pnp = _persons(np.random.default_rng(2), mirrored="p1")
    rows = agree.person_rows(names, labels, pnp, pnp[:, 0] / 100, 10.0, 0.12)
    p1 = rows[1]
    assert p1.pnp.correlation < -0.95 and p1.pnp.right_sign is False and p1.pnp.same_sign == 0
    assert p1.nose.right_sign is False
    assert rows[-1].pnp.correlation < 0.8
    assert "MISSED" in agree.verdict(rows) and "WRONG sign: p1" in agree.verdict(rows)


def test_correlation_is_nan_without_spread_or_frames(agree: ModuleType) -> None:
    assert np.isnan(agree.correlation(np.ones(5), np.arange(5.0)))
    assert np.isnan(agree.correlation(np.arange(2.0), np.arange(2.0)))
    assert (
        agree.rows_to_json(
            agree.person_rows(["a"], np.zeros((1, 3)), np.zeros((1, 3)), np.zeros(1), 10, 0.1)
        )[0]["pnp"]["correlation"]
        is None
    )


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_clips_are_found_in_a_checkout_a_bare_git_dir_and_a_plain_folder(
    real_clips: ModuleType, tmp_path: Path
) -> None:
    repo = tmp_path / "LivePortrait"
    for rel in ("assets/examples/driving/d0.mp4", "assets/examples/source/s1.mp4"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(b"clip " + rel.encode())
    (repo / "assets/examples/source/s2.jpg").write_bytes(b"a photo, not a clip")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clips")
    assert sorted(real_clips.list_clips(repo)) == ["d0", "s1"]
    assert real_clips.list_clips(repo / ".git")["d0"] == "git:assets/examples/driving/d0.mp4"
    got = real_clips.extract_clips(repo / ".git", tmp_path / "videos")
    assert sorted(p.name for p in got) == ["d0.mp4", "s1.mp4"]
    assert (tmp_path / "videos/s1.mp4").read_bytes() == b"clip assets/examples/source/s1.mp4"
    assert sorted(real_clips.list_clips(tmp_path / "videos")) == ["d0", "s1"]


def test_lfs_pointers_and_empty_folders_are_refused_by_name(
    real_clips: ModuleType, tmp_path: Path
) -> None:
    with pytest.raises(real_clips.BenchmarkError, match="no clips in assets/examples/driving"):
        real_clips.list_clips(tmp_path)
    (tmp_path / "d0.mp4").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0")
    with pytest.raises(real_clips.BenchmarkError, match="d0.mp4 is a Git LFS pointer"):
        real_clips.extract_clips(tmp_path, tmp_path / "out")


def test_the_photo_is_the_requested_frame(real_clips: ModuleType, tmp_path: Path) -> None:
    import cv2

    video = tmp_path / "p.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for value in (0, 80, 160, 240):
        writer.write(np.full((48, 64, 3), value, np.uint8))
    writer.release()
    photo = cv2.imread(str(real_clips.write_photo(video, 2, tmp_path / "photos")))
    assert photo.shape == (48, 64, 3) and abs(float(photo.mean()) - 160) < 3
    with pytest.raises(real_clips.BenchmarkError, match="has no frame 9"):
        real_clips.write_photo(video, 9, tmp_path / "photos")


def test_bad_flags_exit_2_with_one_line(
    real_clips: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_model_txt(synthetic_face_68(), tmp_path / "model.txt")
    argv = ["--clips", str(tmp_path / "missing"), "--work", str(tmp_path / "w")]
    assert real_clips.main([*argv, "--face_model", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --face_model {tmp_path / 'none.txt'}: no such file")
    assert err.count("\n") == 1 and not (tmp_path / "w").exists()  # before any work
    assert real_clips.main([*argv, "--face_model", str(model)]) == 2
    assert capsys.readouterr().err.strip().endswith("missing: no such folder")
    assert real_clips.main([*argv, "--face_model", str(model), "--every_k", "1"]) == 2
    assert "--every_k must be >= 2" in capsys.readouterr().err


@pytest.fixture()
def judges(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("real_judges")


def test_top1_picks_the_nearest_persons_mean(judges: ModuleType) -> None:
    real = np.array([[0.0, 0], [0, 0.2], [1, 0], [1, 0.2]])
    owners = ["a", "a", "b", "b"]
    generated = np.array([[0.1, 0.1], [0.9, 0.1], [0.2, 0.0]])
    assert judges.top1(generated, ["a", "b", "b"], real, owners) == pytest.approx(2 / 3)


def _save(path: Path, rgb: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_judges_pass_the_real_frame_and_fail_a_blank_one(
    judges: ModuleType, face: np.ndarray, tmp_path: Path
) -> None:
    from skimage import data

    head = data.astronaut()[20:260, 110:290]  # the astronaut's head, 240 x 180
    _save(tmp_path / "real/astronaut/f0.png", head)
    _save(tmp_path / "same/astronaut/f0.png", head)
    _save(tmp_path / "blank/astronaut/f0.png", np.full_like(head, 128))
    dlib_judges = judges.DlibJudges(face)
    same = judges.judge_pairs(
        judges.paired_images(tmp_path / "same", tmp_path / "real"), dlib_judges
    )
    assert (same.detected_generated, same.detected_real, same.verified) == (1.0, 1.0, 1.0)
    assert same.yaw_err == 0.0 and same.pairs == 1
    blank = judges.judge_pairs(
        judges.paired_images(tmp_path / "blank", tmp_path / "real"), dlib_judges
    )
    assert (blank.detected_generated, blank.verified) == (0.0, 0.0)
    assert "faces detected 0 % (real frames 100 %" in judges.format_report(blank)


def test_judges_name_a_missing_real_frame_and_face_model(
    judges: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _save(tmp_path / "gen/p/f0.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "real").mkdir()
    with pytest.raises(ValueError, match="no real frame for 1 images, e.g. .*real/p/f0.png"):
        judges.paired_images(tmp_path / "gen", tmp_path / "real")
    model = write_model_txt(synthetic_face_68(), tmp_path / "model.txt")
    argv = ["--generated", str(tmp_path / "none"), "--real", str(tmp_path)]
    assert judges.main([*argv, "--face_model", str(model)]) == 2
    assert capsys.readouterr().err.strip().endswith("none: no such folder")
    assert judges.main([*argv, "--face_model", str(tmp_path / "gen")]) == 2  # a folder
    assert "error: --face_model" in capsys.readouterr().err
