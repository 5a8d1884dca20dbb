"""Shard preparation: content, CLI, cache reuse, and no partial output on any error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from controlnet_ray import prepare
from controlnet_ray.config import DataConfig
from controlnet_ray.data import align, preview, shards
from controlnet_ray.data.align import align_face
from controlnet_ray.data.geometry import head_to_camera, project, rotation_from_ypr
from controlnet_ray.data.layout import DataError
from controlnet_ray.data.pairs import SPLIT_RULE, split_persons
from controlnet_ray.data.pose import MEAN_FACE_3D
from controlnet_ray.data.shards import (
    align_workers,
    ensure_shards,
    fingerprint,
    fingerprint_source,
    load_manifest,
    pose_summary,
    preparation,
    prepare_shards,
    publish,
    read_shard_table,
)
from tests.datasets import DEFAULT_PERSONS, corrupt_jpeg, make_legacy_fixture

SPLIT_OF = split_persons(DEFAULT_PERSONS)


def _person_in(split: str) -> str:
    return sorted(n for n, s in SPLIT_OF.items() if s == split)[0]


@pytest.fixture
def fx(tmp_path):
    return make_legacy_fixture(tmp_path / "repo")


def _leftovers(out: Path) -> list[str]:
    """Anything a failed run may have left beside ``out`` (temp or swapped-out dirs)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"partial shard directory left at {out}"
    assert _leftovers(out) == []


# ------------------------------------------------------------------------------- content


def test_prepare_writes_aligned_rows_with_poses(fx, tmp_path, monkeypatch):
    monkeypatch.setattr(align_workers, "_MIN_IMAGES_FOR_POOL", 0)  # exercise the process pool
    out = tmp_path / "shards"
    manifest = prepare_shards(DataConfig(data_dir=fx.data_dir), out, num_workers=2)
    assert _leftovers(out) == []
    assert manifest.counts["total"] == {"persons": 5, "images": 25, "front": 5, "video": 20}
    assert manifest.image_root == str(fx.repo_root.resolve())
    assert manifest.fingerprint == fingerprint_source(fx.data_dir, fx.repo_root)
    assert "yaw > 0 turns the nose" in manifest.conventions
    assert manifest.pairs["per_split"]["val"] > 0 and manifest.pose_report["n_images"] == 25
    assert load_manifest(out).to_dict() == manifest.to_dict()

    table = read_shard_table(out)
    assert table.schema.field("keypoints").type == pa.list_(pa.float32(), 15)
    assert table.schema.field("landmarks").type == pa.list_(pa.float32(), 10)
    assert manifest.framing == "head"
    assert table.schema.field("frame_index").type == pa.int32()
    assert table.schema.field("image").type == pa.binary()
    rows = table.to_pylist()
    assert [r["split"] for r in rows] == sorted((r["split"] for r in rows), key=shards.SPLITS.index)
    kp = {"front": np.load(fx.data_dir / "front_keypoints.npy"), "video": None}
    for r in rows:
        assert r["split"] == SPLIT_OF[r["person_name"]]
        crop = cv2.cvtColor(cv2.imdecode(np.frombuffer(r["image"], np.uint8), 1), cv2.COLOR_BGR2RGB)
        rel = r["image_path"].replace("\\", "/")
        record = next(x for x in fx.fronts + fx.videos if x.image_relpath == rel)
        source = np.asarray(Image.open(fx.image(rel)).convert("RGB"))
        # head framing: scale + shift only; the landmarks column is the source landmarks in crop
        # pixels, so it pins the transform, and the crop is that transform of the source
        src_lm = np.asarray(record.landmarks_2d, np.float64).reshape(5, 2)
        crop_lm = np.asarray(r["landmarks"], np.float64).reshape(5, 2)
        scale = np.linalg.norm(crop_lm[1] - crop_lm[0]) / np.linalg.norm(src_lm[1] - src_lm[0])
        shift = (crop_lm - scale * src_lm).mean(axis=0)
        np.testing.assert_allclose(crop_lm, scale * src_lm + shift, atol=1e-3)
        matrix = np.array([[scale, 0.0, shift[0]], [0.0, scale, shift[1]]])
        assert np.abs(crop.astype(int) - align.crop(source, matrix, 112).astype(int)).max() <= 1
        assert all(np.isfinite([r["yaw"], r["pitch"], r["roll"]]))
        truth = fx.true_poses[rel]
        assert abs(r["yaw"] - truth[0]) < 15, (rel, r["yaw"], truth)
    front_rows = [r for r in rows if r["role"] == "front"]
    by_path = {m["image_path"]: i for i, m in enumerate(fx.load_json("front")["metadata"])}
    for r in front_rows:
        assert r["frame_index"] == -1
        np.testing.assert_allclose(
            r["keypoints"], kp["front"][by_path[r["image_path"]]].ravel(), 1e-6
        )
    assert len(read_shard_table(out, split="val")) == manifest.counts["val"]["images"]
    _assert_pose_report(manifest.pose_report["summary"], table, out)


def _assert_pose_report(summary, table, out):
    """The manifest's pose summary: ranges of the written rows per split, extremes named by
    file, and a contact sheet of them beside the shards."""
    cols = table.select(["split", "yaw", "pitch", "roll", "image_path"]).to_pydict()
    for split in ("train", "val", "all"):
        sel = [i for i, s in enumerate(cols["split"]) if split in ("all", s)]
        for axis in ("yaw", "pitch", "roll"):
            values = [cols[axis][i] for i in sel]
            assert summary["ranges"][split][axis] == pytest.approx(
                [min(values), max(values)], abs=0.051
            )
    highest_yaw = cols["image_path"][int(np.argmax(cols["yaw"]))]
    assert any(e["file"] == highest_yaw and "highest yaw" in e["why"] for e in summary["extremes"])
    sheet = cv2.imread(str(out / summary["contact_sheet"]))
    assert sheet.shape[0] == 112 + preview.LABEL_PX  # one row: the extremes (no outliers)
    assert summary["n_outliers"] == 0 and summary["outliers"] == []


def test_pose_report_names_outliers_by_file():
    """Pitch beyond 45, yaw beyond the model's 90 and a yaw against the nose's side are named
    with their files, the worst first, in a few console lines."""
    nose_right = np.array([[40.0, 50], [70, 50], [62, 70], [44, 90], [68, 90]])  # turned right
    frames = pose_summary.PoseFrames(
        poses=np.array([[10.0, 5, 0], [20, -50, 3], [-95, 0, 0], [-30, 2, 1], [0, 0, 0]]),
        landmarks=np.stack([nose_right] * 5),
        files=[f"video/p/frame_{i}.jpg" for i in range(5)],
        persons=["p"] * 5,
        splits=["train", "train", "val", "val", "test"],
    )
    summary = pose_summary.summarise_poses(frames)
    assert [(e["file"], e["why"]) for e in summary["outliers"]] == [
        ("video/p/frame_1.jpg", "|pitch| > 45"),  # 50 / 45 beyond the limit: the worst
        ("video/p/frame_2.jpg", "|yaw| > 90; yaw opposite to the nose's side"),
        ("video/p/frame_3.jpg", "yaw opposite to the nose's side"),
    ]
    assert summary["ranges"]["val"]["yaw"] == [-95.0, -30.0]
    assert json.loads(json.dumps(summary)) == summary  # what the manifest holds
    lines = pose_summary.summary_lines(summary, Path("shards/pose_extremes.png"))
    assert len(lines) == 3 and lines[0].startswith("poses: yaw -95..+20 pitch -50..+5")
    assert "3 frames: video/p/frame_1.jpg (|pitch| > 45), video/p/frame_2.jpg" in lines[1]
    assert lines[2] == "pose extremes: contact sheet shards/pose_extremes.png"


def test_arcface_framing_keeps_the_5_point_alignment(fx, tmp_path):
    manifest = prepare_shards(
        DataConfig(data_dir=fx.data_dir, framing="arcface"), tmp_path / "s", num_workers=1
    )
    assert manifest.framing == "arcface" and "ArcFace" in manifest.alignment
    for r in read_shard_table(tmp_path / "s").to_pylist()[:6]:
        crop = cv2.cvtColor(cv2.imdecode(np.frombuffer(r["image"], np.uint8), 1), cv2.COLOR_BGR2RGB)
        rel = r["image_path"].replace("\\", "/")
        record = next(x for x in fx.fronts + fx.videos if x.image_relpath == rel)
        source = np.asarray(Image.open(fx.image(rel)).convert("RGB"))
        assert np.array_equal(crop, align_face(source, record.landmarks_2d, 112))


@pytest.mark.parametrize("pose", [(0, 0, 0), (65, -10, 5), (-60, 25, -15), (20, -30, 20)])
def test_head_framing_puts_the_head_centre_at_the_same_place_and_size(pose):
    """Noise-free landmarks of the mean face: the crop centre is the projected head centre and
    the crop side is 2 HEAD_HALF_SIZE_MM at its depth, whatever the pose and distance."""
    w, h, size = 640.0, 480.0, 112
    for trans in ([30.0, -20.0, 600.0], [-80.0, 40.0, 900.0]):
        rot = rotation_from_ypr(*pose)
        lm = project(head_to_camera(MEAN_FACE_3D, rot, np.array(trans)), w, h)
        m = align.head_crop_matrix(lm, np.array(pose, float), w, h, MEAN_FACE_3D, size)
        centre_cam = head_to_camera(align.HEAD_CENTER_MM[None], rot, np.array(trans))
        centre = project(centre_cam, w, h)[0]
        np.testing.assert_allclose(m[:, :2] @ centre + m[:, 2], [size / 2, size / 2], atol=1e-6)
        half_px = w * align.HEAD_HALF_SIZE_MM / centre_cam[0, 2]
        np.testing.assert_allclose(m[0, 0] * 2 * half_px, size, rtol=1e-9)
        assert m[0, 1] == m[1, 0] == 0.0  # upright: roll stays in the image


def test_a_head_crop_mostly_outside_the_image_is_a_bad_image(fx, tmp_path, monkeypatch):
    monkeypatch.setattr(preparation, "MIN_INSIDE_FRACTION", 1.01)  # no crop can satisfy it
    with pytest.raises(DataError, match=r"person '.*': landmarks_2d: only 100% of the head crop"):
        prepare_shards(DataConfig(data_dir=fx.data_dir), tmp_path / "s", num_workers=1)
    assert not (tmp_path / "s").exists()


def test_cli_accepts_the_original_docs_form(fx, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(fx.repo_root)
    argv = ["--data_dir", "train/datas/file", "--image_dir", "train/datas/file"]
    assert prepare.main([*argv, "--out", "shards", "--num_workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"image root: {fx.repo_root.resolve()}" in out and "done: 25 images" in out
    assert load_manifest(fx.repo_root / "shards").counts["total"]["images"] == 25


def test_prepare_cli_takes_trainings_data_flags(capsys):
    """prepare's data flags are DataConfig's: the same defaults and checks, one config built."""
    data, args = prepare.parse_args(["--data_dir", "d"])
    assert data == DataConfig(data_dir="d") and args.out is None and args.address is None
    argv = ["--data_dir", "d", "--split_ratios", "1", "0", "0"]
    argv += ["--pair_mode", "any", "--framing", "arcface", "--skip_bad_images"]
    data, _ = prepare.parse_args([*argv, "--num_workers", "1", "--image_size", "64"])
    assert data == DataConfig(
        data_dir="d",
        split_ratios=(1.0, 0.0, 0.0),
        pair_mode="any",
        framing="arcface",
        skip_bad_images=True,
        num_workers=1,
        image_size=64,
    )
    with pytest.raises(SystemExit):
        prepare.parse_args(["--data_dir", "d", "--image_size", "100"])
    assert "--image_size must be divisible by 16, got 100" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare.parse_args(["--data_dir", "d", "--pair_mode", "all"])
    assert "--pair_mode must be one of {front_to_video, any}" in capsys.readouterr().err
    help_text = " ".join(prepare.build_parser().format_help().split())
    assert "--pair_mode {front_to_video,any}" in help_text and "(default: 5.0)" in help_text


def test_shards_are_capped_in_rows(fx, tmp_path, monkeypatch):
    monkeypatch.setattr(preparation, "MAX_ROWS_PER_SHARD", 4)
    manifest = prepare_shards(DataConfig(data_dir=fx.data_dir), tmp_path / "s", num_workers=1)
    train = manifest.shards["train"]
    assert train == [f"train-{i:05d}.parquet" for i in range(len(train))] and len(train) == 4
    assert len(read_shard_table(tmp_path / "s", split="train")) == 15


# ------------------------------------------------------------------------------- bad input


def test_corrupt_jpeg_fails_and_keeps_the_previous_shards(fx, tmp_path):
    out = tmp_path / "shards"
    prepare_shards(DataConfig(data_dir=fx.data_dir), out, num_workers=1)
    before = (out / "manifest.json").read_bytes()
    corrupt_jpeg(fx.image(fx.videos[5].image_relpath))
    name = Path(fx.videos[5].image_relpath).name
    with pytest.raises(DataError, match=rf"1 of 25 images are missing or unreadable.*{name}"):
        prepare_shards(DataConfig(data_dir=fx.data_dir), out, num_workers=1)
    assert (out / "manifest.json").read_bytes() == before
    assert _leftovers(out) == []
    with pytest.raises(DataError, match="truncated"):
        prepare_shards(DataConfig(data_dir=fx.data_dir), tmp_path / "fresh", num_workers=1)
    _assert_nothing_written(tmp_path / "fresh")


def test_skip_bad_images_records_them(fx, tmp_path, capsys):
    corrupt_jpeg(fx.image(fx.videos[1].image_relpath))
    fx.image(fx.videos[6].image_relpath).unlink()
    manifest = prepare_shards(
        DataConfig(data_dir=fx.data_dir, skip_bad_images=True), tmp_path / "s", num_workers=1
    )
    assert manifest.skipped_count == 2 and manifest.counts["total"]["images"] == 23
    reasons = sorted(s["reason"].split(":")[0] for s in manifest.skipped)
    assert reasons == ["OSError", "missing"]
    assert "skipped 2 bad images" in capsys.readouterr().out


def test_unusual_landmarks_are_kept_recorded_and_summarised_in_one_line(fx, tmp_path, capsys):
    """Reversed eye and mouth order (a real head near profile shows it) needs no flag."""
    doc = fx.load_json("video")
    doc["landmarks_2d"][3] = np.asarray(doc["landmarks_2d"][3])[[1, 0, 2, 4, 3]].tolist()
    fx.save_json("video", doc)
    manifest = prepare_shards(DataConfig(data_dir=fx.data_dir), tmp_path / "s", num_workers=1)
    assert manifest.skipped_count == 0 and manifest.counts["total"]["images"] == 25
    (entry,) = manifest.unusual
    assert (entry["role"], entry["index"]) == ("video", 3)
    assert "left/right order is reversed" in entry["reason"]
    assert load_manifest(tmp_path / "s").unusual == manifest.unusual
    lines = [x for x in capsys.readouterr().out.splitlines() if "have unusual" in x]
    assert len(lines) == 1 and lines[0].startswith("1 of 25 entries have unusual landmarks")
    assert doc["metadata"][3]["image_path"] in lines[0]


def _nan_keypoints(fx):
    kp = np.load(fx.data_dir / "front_keypoints.npy")
    kp[1, 0, 0] = np.nan
    np.save(fx.data_dir / "front_keypoints.npy", kp)


def _drop_keypoint_row(fx):
    kp = np.load(fx.data_dir / "video_keypoints.npy")
    np.save(fx.data_dir / "video_keypoints.npy", kp[1:])


def _bad_landmark_shape(fx):
    doc = fx.load_json("video")
    doc["landmarks_2d"][7] = [[1.0, 2.0, 3.0]] * 5
    fx.save_json("video", doc)


def _escape(fx):
    doc = fx.load_json("video")
    doc["metadata"][3]["image_path"] = "..\\..\\etc\\passwd"
    fx.save_json("video", doc)


def _symlink_out(fx):
    target = fx.image(fx.fronts[0].image_relpath)
    outside = fx.repo_root.parent / "elsewhere.jpg"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)


def _missing(fx):
    fx.image(fx.fronts[2].image_relpath).unlink()


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (_nan_keypoints, r"front_keypoints\.npy: entry 1 \(person 'Anna Li'\).*non-finite"),
        (_drop_keypoint_row, r"video_keypoints\.npy: 19 keypoint rows but video_metadata"),
        (_bad_landmark_shape, r"video_metadata\.json: entry 7 .*field 'landmarks_2d'"),
        (_escape, r"video_metadata\.json: entry 3 .*'\.\.\\\\\.\.\\\\etc\\\\passwd' escapes"),
        (_symlink_out, r"张伟\.jpg.*outside the image root"),
        (_missing, r"1 of 25 images are missing.*bob\.jpg"),
    ],
)
def test_bad_input_is_named_and_leaves_nothing(fx, tmp_path, mutate, pattern):
    mutate(fx)
    out = tmp_path / "shards"
    with pytest.raises(DataError, match=pattern):
        prepare_shards(DataConfig(data_dir=fx.data_dir), out, num_workers=1)
    _assert_nothing_written(out)


def test_person_without_video_is_reported(tmp_path, capsys):
    lonely = _person_in("train")
    fx = make_legacy_fixture(tmp_path / "repo", no_video=(lonely,))
    manifest = prepare_shards(DataConfig(data_dir=fx.data_dir), tmp_path / "s", num_workers=1)
    assert manifest.persons_without_video == [lonely]
    assert (
        f"have no video frames (no front_to_video pairs): ['{lonely}']" in capsys.readouterr().err
    )


def test_split_without_pairs_is_an_error_naming_it(tmp_path):
    fx = make_legacy_fixture(tmp_path / "repo", no_video=(_person_in("val"),))
    with pytest.raises(DataError, match=r"split 'val' has no front_to_video pairs"):
        prepare_shards(DataConfig(data_dir=fx.data_dir), tmp_path / "s", num_workers=1)
    _assert_nothing_written(tmp_path / "s")
    # "any" pairs front photos too, but a lone photo has no partner either
    with pytest.raises(DataError, match=r"split 'val' has no any pairs"):
        prepare_shards(
            DataConfig(data_dir=fx.data_dir, pair_mode="any"), tmp_path / "s", num_workers=1
        )


def test_empty_split_is_an_error(tmp_path):
    fx = make_legacy_fixture(tmp_path / "repo", persons=("solo",))
    with pytest.raises(DataError, match=r"split '(val|test|train)' has no front_to_video pairs"):
        prepare_shards(DataConfig(data_dir=fx.data_dir), tmp_path / "s", num_workers=1)
    _assert_nothing_written(tmp_path / "s")


def test_error_while_writing_removes_the_temp_dir(fx, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    prepare_shards(DataConfig(data_dir=fx.data_dir), out, num_workers=1)
    before = sorted(p.name for p in out.iterdir())

    def disk_full(self):
        raise OSError("No space left on device")

    monkeypatch.setattr(publish._ShardWriter, "flush", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare_shards(DataConfig(data_dir=fx.data_dir), out, num_workers=1)
    assert sorted(p.name for p in out.iterdir()) == before and _leftovers(out) == []


def test_refuses_to_replace_a_foreign_directory(fx, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a shard directory"):
        prepare_shards(DataConfig(data_dir=fx.data_dir), out, num_workers=1)
    assert (out / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------- cache


def test_ensure_shards_prepares_then_reuses(fx, tmp_path, capsys):
    cfg = DataConfig(data_dir=str(fx.data_dir), cache_dir=str(tmp_path / "cache"), num_workers=1)
    first = ensure_shards(cfg)
    assert "preparing shards at" in capsys.readouterr().out
    assert first.parent == tmp_path / "cache" / "shards" and first.name.split("-")[1] == "112"
    assert ensure_shards(cfg) == first
    assert f"reusing shards at {first}" in capsys.readouterr().out

    image = fx.image(fx.videos[0].image_relpath)
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = ensure_shards(cfg)
    assert second != first and "preparing shards at" in capsys.readouterr().out

    cfg.split_ratios = (0.6, 0.2, 0.2)
    assert ensure_shards(cfg).name.split("-")[2] != second.name.split("-")[2]


def test_a_cache_split_by_another_rule_is_never_reused(fx, tmp_path, capsys, monkeypatch):
    """The split rule is in the cache key and the manifest: a folder whose manifest was split
    by an earlier rule (rule 1 wrote none) is prepared again, not reused."""
    cfg = DataConfig(data_dir=str(fx.data_dir), cache_dir=str(tmp_path / "cache"), num_workers=1)
    first = ensure_shards(cfg)
    assert load_manifest(first).split_rule == SPLIT_RULE
    doc = json.loads((first / "manifest.json").read_text(encoding="utf-8"))
    del doc["split_rule"]
    (first / "manifest.json").write_text(json.dumps(doc), encoding="utf-8")
    capsys.readouterr()
    assert ensure_shards(cfg) == first
    assert "preparing shards at" in capsys.readouterr().out
    assert load_manifest(first).split_rule == SPLIT_RULE
    monkeypatch.setattr(fingerprint, "SPLIT_RULE", SPLIT_RULE + 1)
    assert ensure_shards(cfg).name.split("-")[2] != first.name.split("-")[2]


def test_few_held_out_persons_are_warned_about_when_prepared_and_reused(fx, tmp_path, capsys):
    """5 persons cannot give 3 per split: the run goes on and says so in one line, both when
    it prepares the shards and when it reuses them."""
    cfg = DataConfig(data_dir=str(fx.data_dir), cache_dir=str(tmp_path / "cache"), num_workers=1)
    for _ in range(2):
        ensure_shards(cfg)
        lines = [x for x in capsys.readouterr().err.splitlines() if "held-out persons" in x]
        assert len(lines) == 1 and lines[0].startswith("warning: few held-out persons (")
        assert "of 5): " in lines[0] and "use at least 9 persons" in lines[0]


def test_ensure_shards_rechecks_skipped_images_and_pairs(fx, tmp_path):
    corrupt_jpeg(fx.image(fx.videos[3].image_relpath))
    cfg = DataConfig(
        data_dir=str(fx.data_dir),
        cache_dir=str(tmp_path / "cache"),
        num_workers=1,
        skip_bad_images=True,
    )
    ensure_shards(cfg)
    cfg.skip_bad_images = False
    with pytest.raises(DataError, match="1 of 25 images are missing or unreadable"):
        ensure_shards(cfg)
    cfg.skip_bad_images, cfg.min_pose_distance, cfg.max_pose_distance = True, 89.0, 90.0
    with pytest.raises(DataError, match="has no front_to_video pairs"):
        ensure_shards(cfg)


def test_model_proxy_units_match_the_head_framing():
    """model.warp states the face square in crop units; data.align defines those units. At a
    frontal pose, the face square of a head-framed crop must be the ArcFace square: eyes
    35.2 px apart at 112 px and its centre just below the eye line."""
    from controlnet_ray.model.warp import face_grid

    w, h, size = 640.0, 480.0, 112
    lm = project(head_to_camera(MEAN_FACE_3D, np.eye(3), np.array([0.0, 0.0, 700.0])), w, h)
    m = align.head_crop_matrix(lm, np.zeros(3), w, h, MEAN_FACE_3D, size)
    crop_lm = lm @ m[:, :2].T + m[:, 2]  # pixels of the head-framed crop
    grid = face_grid(torch.zeros(1, 3), size)[0].numpy()  # crop coordinates in [-1, 1]
    face_px = (grid + 1) * size / 2  # the face square's pixel centres in the crop
    scale = (face_px[0, -1, 0] - face_px[0, 0, 0]) / (size - 1)  # crop px per face px
    iod_face_px = (crop_lm[1, 0] - crop_lm[0, 0]) / scale
    assert abs(iod_face_px - 35.2) < 2.5, iod_face_px
    centre = face_px[size // 2, size // 2]
    eye_y = crop_lm[:2, 1].mean()
    assert abs(centre[0] - crop_lm[2, 0]) < 1.0
    assert eye_y < centre[1] < crop_lm[2, 1]  # between the eyes and the nose tip
