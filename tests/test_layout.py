"""Original layout: writer schema, reader validation, path safety, alignment, split, pairing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from controlnet_ray.data import geometry
from controlnet_ray.data.align import align_face, alignment_matrix, arcface_template
from controlnet_ray.data.layout import DataError, read_legacy_dataset, write_legacy_dataset
from controlnet_ray.data.legacy import legacy_euler_deg, legacy_fit
from controlnet_ray.data.pairs import (
    MIN_SPLIT_PERSONS,
    count_split_pairs,
    few_persons_warning,
    make_pairs,
    person_unit,
    split_persons,
    split_summary,
)
from tests.datasets import make_legacy_fixture, project_landmarks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return make_legacy_fixture(tmp_path_factory.mktemp("legacy"))


@pytest.fixture
def fx(tmp_path):
    """A fresh fixture per test that mutates it."""
    return make_legacy_fixture(tmp_path / "repo", frames_per_person=3)


# ------------------------------------------------------------------------------- writer


def test_writer_produces_the_original_schema(fixture_dir):
    front, video = fixture_dir.load_json("front"), fixture_dir.load_json("video")
    assert list(front) == [
        "num_samples",
        "feature_dim",
        "standard_info",
        "metadata",
        "poses",
        "boxes",
        "landmarks_2d",
        "landmarks_3d_original",
    ]
    assert "standard_info" not in video and video["landmarks_3d_original"] == []
    info = front["standard_info"]
    assert set(info) >= {"standard_center", "standard_scale", "standard_landmarks", "note"}
    assert 0.02 < info["standard_scale"] < 0.03
    assert front["num_samples"] == len(front["metadata"]) == 5 and front["feature_dim"] == 512
    m = video["metadata"][0]
    assert m["image_path"] == "train\\datas\\video\\张伟\\张伟frame_000000.jpg"
    assert m["frame_index"] == "张伟frame_000000" and m["image_size"] == [96, 96]
    raw = (fixture_dir.data_dir / "front_metadata.json").read_text(encoding="utf-8")
    assert "张伟" in raw  # ensure_ascii=False
    assert np.load(fixture_dir.data_dir / "video_keypoints.npy").shape == (20, 5, 3)


def test_writer_stores_legacy_pnp_values(fixture_dir):
    front = fixture_dir.load_json("front")
    scale = front["standard_info"]["standard_scale"]
    kp = np.load(fixture_dir.data_dir / "front_keypoints.npy")
    for i, rec in enumerate(fixture_dir.fronts):
        fit = legacy_fit(rec.landmarks_2d, rec.image_size)
        np.testing.assert_allclose(front["poses"][i], fit.euler_deg, atol=1e-6)
        lm3d = np.asarray(front["landmarks_3d_original"][i])
        np.testing.assert_allclose(kp[i], (lm3d - lm3d.mean(0)) * scale, atol=1e-9)


def test_writer_can_centre_keypoints_on_the_standard_center(fixture_dir, tmp_path):
    out = write_legacy_dataset(
        tmp_path / "d",
        fixture_dir.fronts,
        fixture_dir.videos,
        fixture_dir.repo_root,
        keypoint_center="standard",
    )
    with open(out / "front_metadata.json", encoding="utf-8") as f:
        front = json.load(f)
    info = front["standard_info"]
    lm3d = np.asarray(front["landmarks_3d_original"])
    expected = (lm3d - np.asarray(info["standard_center"])) * info["standard_scale"]
    np.testing.assert_allclose(np.load(out / "front_keypoints.npy"), expected, atol=1e-9)
    assert "standard_center" in info["note"]


def test_legacy_poses_are_the_originals_permuted_angles():
    """Frontal face: R maps y-up to y-down, so the original's third angle is ~180 degrees."""
    lm = project_landmarks((0, 0, 0), (640, 480), 150, (320, 240))
    fit = legacy_fit(lm, (640, 480))
    assert abs(abs(fit.euler_deg[2]) - 180) < 0.5 and np.abs(fit.euler_deg[:2]).max() < 0.5
    reproj = geometry.project(fit.landmarks_3d, 640, 480)
    assert np.abs(reproj - lm).max() < 5.0  # EPnP on 5 near-coplanar points is approximate
    rot = geometry.rotation_from_ypr(0, 0, 30)
    assert np.allclose(legacy_euler_deg(rot), [30, 0, 0])


# ------------------------------------------------------------------------------- reader


def test_reader_round_trip(fixture_dir):
    ds = read_legacy_dataset(fixture_dir.data_dir)
    assert ds.image_root_used == fixture_dir.repo_root.resolve()
    assert len(ds) == 25 and not ds.skipped
    assert {"张伟", "Anna Li"} <= set(ds.person_names())
    video = [e for e in ds.entries if e.role == "video" and e.person_name == "Anna Li"]
    assert [e.frame_index for e in video] == [1, 11, 21, 31]
    assert all(e.frame_index == -1 for e in ds.entries if e.role == "front")
    e = video[0]
    assert e.image_path == "train\\datas\\video\\Anna Li\\Anna Liframe_000001.jpg"
    assert e.resolved_path.is_file() and e.keypoints.shape == (5, 3)
    assert e.landmarks_2d.dtype == np.float32 and e.image_size == (96, 96)


def test_original_docs_form_resolves_from_repo_root(fixture_dir, caplog):
    caplog.set_level("INFO")
    ds = read_legacy_dataset(
        "train/datas/file", image_dir="train/datas/file", cwd=fixture_dir.repo_root
    )
    assert ds.image_root_used == fixture_dir.repo_root.resolve()
    assert str(fixture_dir.repo_root.resolve()) in caplog.text


def test_integer_frame_index_and_missing_frame_index(fx):
    doc = fx.load_json("video")
    doc["metadata"][0]["frame_index"] = 77
    del doc["metadata"][1]["frame_index"]
    fx.save_json("video", doc)
    ds = read_legacy_dataset(fx.data_dir)
    frames = [e.frame_index for e in ds.entries if e.role == "video"]
    assert frames[0] == 77 and frames[1] == int(doc["metadata"][1]["image_path"][-10:-4])


def test_missing_image_is_an_error_or_skipped(fx):
    victim = fx.image(fx.videos[2].image_relpath)
    victim.unlink()
    name = Path(fx.videos[2].image_relpath).name
    with pytest.raises(DataError, match=rf"1 of 20 images are missing.*{name}") as err:
        read_legacy_dataset(fx.data_dir)
    assert "--skip_bad_images" in str(err.value)
    ds = read_legacy_dataset(fx.data_dir, skip_bad_images=True)
    assert len(ds) == 19 and ds.skipped[0].person_name == fx.videos[2].person_name
    assert ds.skipped[0].reason == "missing"


def test_nan_in_keypoints_names_file_entry_and_person(fx):
    kp = np.load(fx.data_dir / "video_keypoints.npy")
    kp[4, 2, 1] = np.nan
    np.save(fx.data_dir / "video_keypoints.npy", kp)
    person = fx.videos[4].person_name
    pattern = rf"video_keypoints\.npy: entry 4 \(person '{person}'\): field 'keypoints'"
    with pytest.raises(DataError, match=pattern):
        read_legacy_dataset(fx.data_dir)


def test_keypoint_rows_must_match_metadata(fx):
    kp = np.load(fx.data_dir / "front_keypoints.npy")
    np.save(fx.data_dir / "front_keypoints.npy", kp[:-1])
    with pytest.raises(DataError, match=r"front_keypoints\.npy: 4 keypoint rows .* 5 metadata"):
        read_legacy_dataset(fx.data_dir)


def test_wrong_keypoint_shape(fx):
    np.save(fx.data_dir / "front_keypoints.npy", np.zeros((5, 68, 3)))
    with pytest.raises(DataError, match=r"front_keypoints\.npy: .*\[N, 5, 3\], got \[5, 68, 3\]"):
        read_legacy_dataset(fx.data_dir)


def test_wrong_landmark_shape_names_entry_and_field(fx):
    doc = fx.load_json("front")
    doc["landmarks_2d"][3] = doc["landmarks_2d"][3][:4]
    fx.save_json("front", doc)
    with pytest.raises(
        DataError, match=r"front_metadata\.json: entry 3 \(person 'carol'\): field 'landmarks_2d'"
    ):
        read_legacy_dataset(fx.data_dir)


def test_count_mismatch_between_fields(fx):
    doc = fx.load_json("video")
    doc["boxes"].pop()
    fx.save_json("video", doc)
    with pytest.raises(DataError, match=r"video_metadata\.json: field 'boxes' has 14 rows .* 15"):
        read_legacy_dataset(fx.data_dir)


def test_nan_in_json_field(fx):
    doc = fx.load_json("front")
    doc["boxes"][1][2] = float("nan")
    fx.save_json("front", doc)
    with pytest.raises(
        DataError, match=r"entry 1 \(person 'Anna Li'\): field 'boxes' has non-finite"
    ):
        read_legacy_dataset(fx.data_dir)


@pytest.mark.parametrize("bad", ["..\\..\\etc\\passwd", "/etc/passwd", "C:\\Windows\\win.ini"])
def test_paths_escaping_the_root_are_refused(fx, bad):
    doc = fx.load_json("front")
    doc["metadata"][2]["image_path"] = bad
    fx.save_json("front", doc)
    with pytest.raises(DataError, match=r"entry 2 \(person 'bob'\): field 'image_path' .*escapes"):
        read_legacy_dataset(fx.data_dir, skip_bad_images=True)


def test_symlink_out_of_the_root_is_refused(fx, tmp_path):
    outside = tmp_path / "outside.jpg"
    target = fx.image(fx.fronts[1].image_relpath)
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(DataError, match=r"Anna Li\.jpg.*outside the image root"):
        read_legacy_dataset(fx.data_dir, image_dir=fx.repo_root)


def test_symlink_inside_the_root_is_fine(fx):
    target = fx.image(fx.fronts[1].image_relpath)
    copy = target.with_name("copy.jpg")
    copy.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(copy)
    assert len(read_legacy_dataset(fx.data_dir)) == 20


def test_invalid_json_is_named(fx):
    (fx.data_dir / "video_metadata.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"video_metadata\.json: not valid UTF-8 JSON"):
        read_legacy_dataset(fx.data_dir)


# ------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("size", [112, 224, 128, 96])
def test_alignment_puts_landmarks_on_the_template(size):
    """Draw coloured dots at rotated/scaled landmarks; after warping they sit on the template."""
    import cv2

    angle, scale, shift = np.deg2rad(17.0), 2.3, np.array([150.0, 90.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    lm = (geometry.ARCFACE_TEMPLATE_112 - 56) @ rot.T * scale + shift + 56
    img = np.zeros((420, 420, 3), np.uint8)
    for k, p in enumerate(lm):
        colour = [0, 0, 0]
        colour[k % 3] = 255
        cv2.circle(
            img, (int(round(p[0])), int(round(p[1]))), 4, colour if k < 3 else (255, 255, 255), -1
        )
    crop = align_face(img, lm, size)
    assert crop.shape == (size, size, 3)
    template = arcface_template(size)
    for k in range(3):  # the three single-channel dots
        others = np.delete(crop, k, axis=-1).astype(int)
        pure = crop[..., k] > 4 * others.max(axis=-1)  # not the grey edges of the white dots
        weight = np.where(pure, crop[..., k].astype(float), 0.0)
        ys, xs = np.mgrid[:size, :size]
        centroid = np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()
        assert np.linalg.norm(centroid - template[k]) < 1.0
    moved = lm @ alignment_matrix(lm, size)[:, :2].T + alignment_matrix(lm, size)[:, 2]
    assert np.abs(moved - template).max() < 1.0


def test_alignment_matches_insightface_for_112_multiples():
    from insightface.utils import face_align

    rng = np.random.default_rng(0)
    lm = geometry.ARCFACE_TEMPLATE_112 * 1.7 + 20 + rng.normal(0, 2, (5, 2))
    img = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
    with pytest.warns(FutureWarning):  # scikit-image deprecation inside insightface
        ref_matrix = face_align.estimate_norm(lm, 224)
        ref = face_align.norm_crop(img, lm, 224)
    np.testing.assert_allclose(alignment_matrix(lm, 224), ref_matrix, atol=1e-9)
    assert np.array_equal(align_face(img, lm, 224), ref)


# ------------------------------------------------------------------------------- split


def test_split_is_deterministic_across_processes():
    names = [f"person {i}" for i in range(40)] + ["张伟", "Zoë"]
    here = split_persons(names)
    code = (
        "import json,sys; from controlnet_ray.data.pairs import split_persons;"
        "print(json.dumps(split_persons(json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(names)], env=env, capture_output=True, check=True
    )
    assert json.loads(out.stdout) == here
    assert person_unit("张伟") == person_unit("张伟") and 0 <= person_unit("x") < 1


def test_split_ratios_are_respected_roughly():
    names = [f"p{i}" for i in range(3000)]
    split = split_persons(names, (0.6, 0.3, 0.1))
    frac = {s: sum(v == s for v in split.values()) / 3000 for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.6) < 0.04 and abs(frac["val"] - 0.3) < 0.04
    assert set(split_persons(names[:50], (1, 0, 0)).values()) == {"train"}


def test_three_persons_always_get_a_val_split():
    for k in range(60):
        names = [f"a{k}", f"b{k}", f"c{k}"]
        split = split_persons(names)
        assert set(split.values()) == {"train", "val", "test"}, split
    assert "val" not in split_persons(["x", "y", "z"], (0.8, 0.0, 0.2)).values()


@pytest.mark.parametrize("ratios", [(0.7, 0.15, 0.15), (0.8, 0.2, 0.0), (0.5, 0.1, 0.4)])
def test_small_data_gives_every_split_three_persons_when_it_can(ratios):
    positive = [s for s, r in zip(("train", "val", "test"), ratios, strict=True) if r > 0]
    for n in range(3 * len(positive), 31):
        for prefix in ("p", "person ", "合成_"):
            names = [f"{prefix}{i}" for i in range(n)]
            split = split_persons(names, ratios)
            sizes = {s: sum(v == s for v in split.values()) for s in positive}
            assert min(sizes.values()) >= MIN_SPLIT_PERSONS, (n, prefix, sizes)
            assert set(split.values()) == set(positive)
            assert split_persons(list(reversed(names)), ratios) == split  # the set decides
            assert few_persons_warning(sizes, ratios) is None


def test_small_data_top_up_moves_only_what_it_must():
    """The 21-person case (hashed 19 / 1 / 1): persons whose hashed split is not short stay
    where the ratios put them; train gives exactly what val and test lack."""
    names = [f"p{i}" for i in range(21)]
    edges = {"train": 0.7, "val": 0.85}
    hashed = {n: next((s for s, hi in edges.items() if person_unit(n) < hi), "test") for n in names}
    split = split_persons(names)
    moved = [n for n in names if split[n] != hashed[n]]
    lacking = sum(max(0, 3 - list(hashed.values()).count(s)) for s in ("val", "test"))
    assert lacking > 0 and len(moved) == lacking
    assert all(hashed[n] == "train" for n in moved)


def test_few_persons_warning_says_what_to_do():
    assert few_persons_warning({"train": 9, "val": 3, "test": 3}, (0.7, 0.15, 0.15)) is None
    line = few_persons_warning({"train": 6, "val": 1, "test": 1}, (0.7, 0.15, 0.15))
    assert line is not None and "\n" not in line
    assert "val 1 and test 1 of 8" in line and "at least 9 persons" in line
    assert "--split_ratios 0.7 0.3 0" in line
    tiny = few_persons_warning({"train": 3, "val": 1, "test": 1}, (0.7, 0.15, 0.15))
    assert tiny is not None and "--split_ratios" not in tiny  # 5 persons: 3 + 3 impossible
    one = few_persons_warning({"train": 4, "val": 1, "test": 0}, (0.8, 0.2, 0.0))
    assert one is not None and "val 1 of 5" in one and "at least 6 persons" in one
    assert few_persons_warning({"train": 5, "val": 1}, (1.0, 0.0, 0.0)) is None


def test_split_summary_counts():
    split = {"a": "train", "b": "val", "c": "test"}
    text = split_summary(split, ["a", "a", "b", "c"], ["front", "video", "front", "front"])
    assert "train: 1 persons, 2 images (1 front, 1 video)" in text


# ------------------------------------------------------------------------------- pairs


def _rows():
    return pd.DataFrame(
        {
            "person_name": ["a", "a", "a", "a", "b", "b", "c"],
            "role": ["front", "video", "video", "video", "front", "front", "front"],
            "yaw": [0.0, 3.0, 5.0, 95.0, 0.0, 30.0, 0.0],
            "pitch": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            "roll": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        }
    )


def test_front_to_video_is_the_original_rule():
    pairs = make_pairs(_rows(), mode="front_to_video", min_deg=5, max_deg=90)
    assert pairs.tolist() == [[0, 2]]  # 3 deg too close, 95 deg too far, b/c have no video


def test_any_mode_uses_all_distinct_images_of_a_person():
    pairs = make_pairs(_rows(), mode="any", min_deg=5, max_deg=90)
    expected = [(0, 2), (2, 0), (2, 3), (3, 2), (4, 5), (5, 4)]  # 90 deg is inside
    assert sorted(map(tuple, pairs.tolist())) == expected


def test_pose_distance_is_euclidean_in_degrees():
    rows = [("p", "front", 0, 0, 0), ("p", "video", 3, 4, 0), ("p", "video", 6, 8, 0)]
    assert make_pairs(rows, min_deg=5, max_deg=5).tolist() == [[0, 1]]
    wrapped = [("p", "front", 0, 0, 179), ("p", "video", 0, 0, -179)]
    assert make_pairs(wrapped, min_deg=0, max_deg=3).tolist() == [[0, 1]]


def test_split_without_pairs_is_an_error_naming_it():
    rows = _rows()
    splits = ["train"] * 4 + ["val"] * 2 + ["test"]
    with pytest.raises(DataError, match=r"split 'val' has no front_to_video pairs.*'b'"):
        count_split_pairs(rows, splits, required=("train", "val"))
    counts = count_split_pairs(rows, splits, mode="any", required=("train", "val"))
    assert counts == {"train": 4, "val": 2, "test": 0}


# ------------------------------------------------------------------------------- plausibility


def _set_landmarks(fx, role: str, index: int, lm) -> str:
    doc = fx.load_json(role)
    doc["landmarks_2d"][index] = np.asarray(lm, dtype=float).tolist()
    fx.save_json(role, doc)
    return doc["metadata"][index]["person_name"]


def _frontal(size: float = 96.0) -> np.ndarray:
    """ArcFace's template landmarks scaled to a ``size`` px image: a plausible frontal face."""
    t = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])
    return t * size / 112.0


@pytest.mark.parametrize(
    ("case", "landmarks", "reason"),
    [
        ("outside", _frontal() + [5e3, -3e3], r"landmark 0 at \(5032\.8, -2955\.7\) is far out"),
        ("collapsed", np.full((5, 2), 40.0), "landmarks collapsed onto one point"),
        ("eyes_apart", [[-5, 50], [101, 50], [48, 60], [30, 80], [66, 80]], "eyes 106.0 px apart"),
    ],
)  # fmt: skip
def test_impossible_landmarks_are_a_data_error_or_skipped(fx, case, landmarks, reason):
    person = _set_landmarks(fx, "video", 7, landmarks)
    where = rf"video_metadata\.json: entry 7 \(person '{person}'\): field 'landmarks_2d': "
    with pytest.raises(DataError, match=where + reason) as err:
        read_legacy_dataset(fx.data_dir)
    assert "--skip_bad_images" in str(err.value) and "\n" not in str(err.value)
    ds = read_legacy_dataset(fx.data_dir, skip_bad_images=True)
    assert len(ds) == 19 and not any(e.role == "video" and e.index == 7 for e in ds.entries)
    (skipped,) = ds.skipped
    assert (skipped.role, skipped.index, skipped.person_name) == ("video", 7, person)
    assert re.search(reason, skipped.reason)


@pytest.mark.parametrize(
    ("landmarks", "reason"),
    [
        (_frontal()[[1, 0, 2, 4, 3]], "the eyes' and mouth corners' left/right order is reversed"),
        ([[30, 50], [66, 50], [48, 53], [40, 56], [56, 56]], r"inter-ocular distance 36\.0 px "),
    ],
    ids=["order_reversed", "steep_pitch"],
)  # fmt: skip
def test_unusual_landmarks_are_kept_and_recorded(fx, landmarks, reason):
    """What a real head can show (the eyes' order reverses near profile) is no data error."""
    assert read_legacy_dataset(fx.data_dir).unusual == []
    person = _set_landmarks(fx, "video", 7, landmarks)
    ds = read_legacy_dataset(fx.data_dir)  # no skip_bad_images needed
    assert len(ds) == 20 and ds.skipped == []
    assert any(e.role == "video" and e.index == 7 for e in ds.entries)
    (unusual,) = ds.unusual
    assert (unusual.role, unusual.index, unusual.person_name) == ("video", 7, person)
    assert re.search("field 'landmarks_2d': " + reason, unusual.reason)


def test_strong_poses_of_the_fixture_and_template_are_plausible():
    from controlnet_ray.data.plausibility import landmark_problem

    for yaw in (-90, -80, -45, 0, 45, 80, 90):  # full profile: both eyes on one point
        for pitch in (-30, 0, 30):
            for roll in (-90, 0, 150):
                lm = project_landmarks((yaw, pitch, roll), (200, 200), 60, (100, 100))
                assert landmark_problem(lm, (200, 200)) is None, (yaw, pitch, roll)


def test_huge_keypoints_name_the_npy_entry(fx):
    """1e30 is finite (also in float32) but no normalised face: a data error, like NaN."""
    kp = np.load(fx.data_dir / "front_keypoints.npy")
    kp[2, 1, 0] = 1e30
    np.save(fx.data_dir / "front_keypoints.npy", kp)
    person = fx.fronts[2].person_name
    pattern = rf"front_keypoints\.npy: entry 2 \(person '{person}'\): field 'keypoints': .*1e\+30"
    with pytest.raises(DataError, match=pattern):
        read_legacy_dataset(fx.data_dir)
    assert read_legacy_dataset(fx.data_dir, skip_bad_images=True).skipped[0].index == 2


@pytest.mark.parametrize(
    ("convert", "shown"),
    [
        (lambda kp: kp > 0, r"bool \(booleans\)"),
        (lambda kp: kp + 1j, r"complex128 \(complex numbers\)"),
        (lambda kp: kp.astype(str), r"<U\d+ \(text\)"),  # numeric strings: would convert
        (lambda kp: np.full(kp.shape, "abc"), r"<U3 \(text\)"),  # would fail, naming no file
        (lambda kp: kp.astype("S24"), r"\|S24 \(bytes\)"),
        (lambda kp: kp.astype(object), r"object \(Python objects\)"),
    ],
    ids=["bool", "complex", "numeric_strings", "strings", "bytes", "object"],
)
def test_keypoints_that_are_not_real_numbers_are_refused_naming_file_and_dtype(fx, convert, shown):
    path = fx.data_dir / "video_keypoints.npy"
    np.save(path, convert(np.load(path)), allow_pickle=True)
    pattern = re.escape(f"{path}: keypoints must be real numbers (integer or float), got dtype ")
    with pytest.raises(DataError, match=pattern + shown + "$") as err:
        read_legacy_dataset(fx.data_dir, skip_bad_images=True)  # not skippable: the whole file
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", ["int64", "int16", "uint8", "float16", "float32", ">f8"])
def test_integer_and_float_keypoints_are_read(fx, dtype):
    path = fx.data_dir / "front_keypoints.npy"
    kp = np.load(path)
    stored = (kp * 100).astype(dtype) if dtype[0] in "iu" else kp.astype(dtype)
    np.save(path, stored)
    ds = read_legacy_dataset(fx.data_dir)
    fronts = [e.keypoints for e in ds.entries if e.role == "front"]
    np.testing.assert_array_equal(np.stack(fronts), stored.astype(np.float32))


def test_the_same_image_listed_twice_is_refused_naming_both_entries(fx):
    doc = fx.load_json("front")
    doc["metadata"][3]["image_path"] = doc["metadata"][1]["image_path"]
    doc["metadata"][3]["person_name"] = doc["metadata"][1]["person_name"]
    fx.save_json("front", doc)
    person = doc["metadata"][1]["person_name"]
    pattern = rf"front_metadata\.json: entry 3 \(person '{person}'\): .* repeats "
    pattern += r"front_metadata\.json entry 1"
    with pytest.raises(DataError, match=pattern):
        read_legacy_dataset(fx.data_dir)


def test_several_different_front_photos_of_a_person_are_fine(fx):
    doc = fx.load_json("front")
    doc["metadata"][3]["person_name"] = doc["metadata"][1]["person_name"]  # a 2nd photo of bob
    fx.save_json("front", doc)
    assert len(read_legacy_dataset(fx.data_dir)) == 20
