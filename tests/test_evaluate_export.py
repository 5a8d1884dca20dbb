"""evaluate (report, baselines, ArcFace, grid) and export (ONNX parity, metadata, failures)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from controlnet_ray import evaluate, export
from controlnet_ray.inference import (
    META_CONVENTION,
    META_FORMAT,
    META_IMAGE_SIZE,
    ONNX_FORMAT,
    read_image,
)
from controlnet_ray.judging.arcface import ArcFaceScorer
from controlnet_ray.judging.checkpoint_report import METHODS
from tests.cli_helpers import run_module
from tests.inference_fixtures import TINY_IMAGE_SIZE, aligned_face, cli_args

ARCFACE_INPUT = 32  # a small random iresnet stands in for w600k_r50 (112 px)


def _run(module, capsys, *flags: str, **options) -> tuple[int, str, str]:
    """``module.main`` in-process; ``options`` become ``--key value``."""
    code = module.main(cli_args(*flags, **options))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token} in {path}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def arcface_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A randomly initialised iresnet exported like InsightFace's models (input ``data``)."""
    from controlnet_ray.model.iresnet import IResNet

    torch.manual_seed(0)
    net = IResNet((1, 1, 1, 1), input_size=ARCFACE_INPUT, num_features=64).eval()
    with torch.no_grad():  # non-zero BN shifts: without them the net is blind to input scale
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("arcface") / "arcface.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter, like the model's
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, ARCFACE_INPUT, ARCFACE_INPUT),),
            str(path),
            dynamo=False,
            input_names=["data"],
            output_names=["fc1"],
            dynamic_axes={"data": {0: "n"}},
            opset_version=17,
        )
    return path, net


@pytest.fixture(scope="module")
def report(tiny_checkpoint, tiny_data, arcface_onnx, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval") / "report.json"
    argv = cli_args(
        checkpoint=tiny_checkpoint,
        data_dir=tiny_data.data_dir,
        split="test",
        out=out,
        arcface=arcface_onnx[0],
        cache_dir=tiny_data.cache_dir,
        device="cpu",
    )
    assert evaluate.main(argv) == 0
    return _strict_json(out)


# --------------------------------------------------------------------------- evaluate


def test_report_contents(report, tiny_data):
    doc = report
    assert doc["split"] == "test" and doc["num_pairs"] == len(doc["per_pair"]) > 0
    assert doc["split_ratios"] == [0.7, 0.15, 0.15]  # the checkpoint's: same test persons
    assert doc["num_persons"] < 3  # 4 identities: one person each in val and test
    assert doc["warning"].startswith(f"WARNING: judged on {doc['num_persons']} person")
    assert doc["judged"]["headline"]["warning"] == doc["warning"]
    for method in METHODS:
        s = doc["summary"][method]
        psnr = [p[method]["psnr"] for p in doc["per_pair"]]
        assert s["psnr"] == pytest.approx(np.mean(psnr))
        assert 0 < s["psnr"] < 100 and -1 <= s["ssim"] <= 1
        assert -1 <= s["identity_cos"] <= 1 and set(s["pose_mae_deg"]) == {
            "yaw",
            "pitch",
            "roll",
            "mean",
        }
    bins = doc["psnr_by_target_yaw"]
    assert sum(b["count"] for b in bins) == doc["num_pairs"]
    assert all(b["yaw_to"] - b["yaw_from"] == 10 for b in bins)
    lows = sorted({10 * np.floor(p["target_pose"][0] / 10) for p in doc["per_pair"]})
    assert [b["yaw_from"] for b in bins] == lows
    first = doc["per_pair"][0]
    assert first["source_image"].startswith("train") and len(first["target_pose"]) == 3


def test_judged_section_scores_model_and_trivial_predictors_on_the_same_pairs(report):
    judged = report["judged"]
    assert judged["num_pairs"] == report["num_pairs"]
    assert set(judged["rows"]) == {
        "floor",
        "source",
        "mean",
        "pose_bin",
        "pose_bin_colour",
        "model",
    }
    h = judged["headline"]
    assert h["predictor"] == "model" and h["best_trivial"] in ("pose_bin", "pose_bin_colour")
    rows = judged["rows"]
    assert h["face_psnr_margin_db"] == pytest.approx(
        rows["model"]["psnr_face"] - rows[h["best_trivial"]]["psnr_face"]
    )
    # The judged whole-crop PSNR of the model is evaluate's own (one PSNR, same pairs).
    assert rows["model"]["psnr"] == pytest.approx(report["summary"]["model"]["psnr"], abs=1e-4)
    assert rows["model"]["arcface_cos"] is not None  # --arcface reaches the judged rows too


def test_source_baseline_is_scored_against_the_right_target(report):
    from controlnet_ray.data.decode import decode_image
    from controlnet_ray.data.shards import read_shard_table
    from controlnet_ray.metrics import psnr_per_image

    doc = report
    rows = read_shard_table(doc["shards_dir"], "test").to_pydict()
    by_path = dict(zip(rows["image_path"], rows["image"], strict=True))
    pair = doc["per_pair"][-1]
    src, tgt = (
        torch.from_numpy(decode_image(by_path[pair[k]]))[None]
        for k in ("source_image", "target_image")
    )
    assert float(psnr_per_image(src, tgt)) == pytest.approx(pair["baseline_source"]["psnr"])


def test_grid_png_has_source_target_output_rows(report):
    doc = report
    grid = read_image(doc["grid"])
    tile = 96 + 14  # upscaled tile + caption
    assert grid.shape[0] == 3 * (tile + 2) + 2
    assert grid.shape[1] == min(8, doc["num_pairs"]) * (96 + 2) + 2


def test_arcface_preprocessing_matches_insightface(arcface_onnx):
    path, net = arcface_onnx
    scorer = ArcFaceScorer(path, "cpu")
    assert scorer.input_name == "data" and scorer.size == (ARCFACE_INPUT, ARCFACE_INPUT)
    faces = np.stack([aligned_face(ARCFACE_INPUT), aligned_face(ARCFACE_INPUT)[:, ::-1]])
    x = torch.from_numpy((faces.astype(np.float32) - 127.5) / 127.5).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net(x), dim=1).numpy()
    np.testing.assert_allclose(scorer.embed(faces), ref, atol=1e-4)


def test_without_arcface_identity_is_null_and_table_printed(
    tiny_checkpoint, tiny_data, tmp_path, capsys
):
    out = tmp_path / "r.json"
    code, text, err = _run(
        evaluate,
        capsys,
        checkpoint=tiny_checkpoint,
        data_dir=tiny_data.data_dir,
        split="val",
        out=out,
        cache_dir=tiny_data.cache_dir,
        max_pairs=3,
    )
    assert code == 0, err
    doc = _strict_json(out)
    assert doc["num_pairs"] == 3 and doc["summary"]["model"]["identity_cos"] is None
    assert "baseline_mean_target" in text and "PSNR by target yaw" in text
    table = text.splitlines()
    head = table.index(next(x for x in table if x.startswith("val: 3 pairs of 1 persons")))
    assert table[head - 1].startswith("WARNING: judged on 1 person only")  # above the table
    assert Path(doc["grid"]) == tmp_path / "r_grid.png" and Path(doc["grid"]).is_file()


CASES = ["onnx", "wrong_kind", "missing_dir", "bad_out", "bad_data", "pair_mode", "distances"]


@pytest.mark.parametrize("case", CASES)
def test_evaluate_bad_input(case, tiny_checkpoint, tiny_onnx, tiny_data, tmp_path, capsys):
    """Bad flags fail in one line naming the flag; the data flags are checked by the same
    config checks training runs (an override of the checkpoint's pairing too)."""
    ckpt, data, out = tiny_checkpoint, tiny_data.data_dir, tmp_path / "r.json"
    expect, extra = "", {}
    if case == "onnx":
        ckpt, expect = tiny_onnx, "needs the training .pth"
    elif case == "wrong_kind":
        ckpt = tmp_path / "weights.pth"
        torch.save({"state": torch.zeros(2)}, ckpt)
        expect = str(ckpt)
    elif case == "missing_dir":
        data, expect = tmp_path / "nowhere", "--data_dir"
    elif case == "bad_out":
        out, expect = tmp_path / "missing" / "r.json", "does not exist"
    elif case == "bad_data":
        data = tmp_path / "file"
        data.mkdir()
        (data / "front_metadata.json").write_text("{}")
        expect = "front_metadata.json"
    elif case == "pair_mode":
        extra, expect = {"pair_mode": "sideways"}, "--pair_mode"
    elif case == "distances":
        extra, expect = {"min_pose_distance": 50, "max_pose_distance": 10}, "_pose_distance"
    code, _, err = _run(
        evaluate,
        capsys,
        checkpoint=ckpt,
        data_dir=data,
        out=out,
        cache_dir=tiny_data.cache_dir,
        **extra,
    )
    assert code == 2 and expect in err, err
    assert not out.exists()


def test_evaluate_subprocess_smoke(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "r.json"
    argv = cli_args(
        checkpoint=tiny_checkpoint,
        data_dir=tiny_data.data_dir,
        out=out,
        cache_dir=tiny_data.cache_dir,
        max_pairs=2,
    )
    proc = run_module("evaluate", *argv, "--no_judges", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reusing shards" in proc.stdout and _strict_json(out)["num_pairs"] == 2


# --------------------------------------------------------------------------- export


def test_onnx_metadata_and_dynamic_batch(tiny_onnx, tiny_checkpoint):
    import onnxruntime as ort

    from controlnet_ray.inference import load_model

    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta[META_FORMAT] == ONNX_FORMAT and meta[META_IMAGE_SIZE] == str(TINY_IMAGE_SIZE)
    assert "yaw > 0 turns the nose" in meta[META_CONVENTION]
    assert [i.name for i in session.get_inputs()] == ["image", "source_pose", "target_pose"]
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).astype(np.float32)
    poses = [rng.uniform(-40, 40, (5, 3)).astype(np.float32) for _ in range(2)]
    (out,) = session.run(
        None, dict(zip(("image", "source_pose", "target_pose"), (image, *poses), strict=True))
    )
    ref = export.torch_reference(load_model(tiny_checkpoint), image, *poses)
    assert out.shape == (5, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert np.abs(out - ref).max() < 1e-4


def test_export_prints_the_difference(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, text, err = _run(export, capsys, checkpoint=tiny_checkpoint, out=out, opset=18)
    assert code == 0, err
    assert "max abs difference" in text and "batch 1" in text and "batch 3" in text


def test_export_failing_check_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    real = export.torch_reference
    monkeypatch.setattr(export, "torch_reference", lambda *a: real(*a) + 0.01)
    out = tmp_path / "m.onnx"
    code, _, err = _run(export, capsys, checkpoint=tiny_checkpoint, out=out)
    assert code == 1 and "not written" in err
    assert list(tmp_path.iterdir()) == []  # no file, no temp left behind


def test_export_to_a_read_only_folder_is_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """As root a chmod'ed folder stays writable, so the refusal is the OS's, simulated: the
    write fails and so does the clean-up; one line, rc 2, no second traceback."""

    def refuse(loaded, path, opset) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    def refuse_unlink(self, missing_ok=False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(export, "export_onnx", refuse)
    monkeypatch.setattr(Path, "unlink", refuse_unlink)
    out = tmp_path / "m.onnx"
    code, _, err = _run(export, capsys, checkpoint=tiny_checkpoint, out=out)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and f"--out {out}" in err and "Permission denied" in err


@pytest.mark.parametrize("case", ["wrong_kind", "missing_folder", "opset", "suffix"])
def test_export_bad_input(case, tiny_checkpoint, tmp_path, capsys):
    ckpt, out, extra, expect = tiny_checkpoint, tmp_path / "m.onnx", {}, ""
    if case == "wrong_kind":
        ckpt = tmp_path / "random.pth"
        torch.save(torch.randn(4), ckpt)
        expect = str(ckpt)
    elif case == "missing_folder":
        out, expect = tmp_path / "no" / "m.onnx", "does not exist"
    elif case == "opset":
        extra, expect = {"opset": 9}, "--opset"
    else:
        out, expect = tmp_path / "m.pth", ".onnx"
    code, _, err = _run(export, capsys, checkpoint=ckpt, out=out, **extra)
    assert code == 2 and expect in err, err
    assert not out.exists()


def test_export_subprocess_smoke(tiny_checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    proc = run_module("export", *cli_args(checkpoint=tiny_checkpoint, out=out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "max abs difference" in proc.stdout and out.is_file()
