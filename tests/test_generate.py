"""generate: aligned crops, photos (landmarks / dlib), sweeps, batch mode, ONNX, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet_ray import generate
from controlnet_ray.data import detect
from controlnet_ray.data.geometry import ARCFACE_TEMPLATE_112
from controlnet_ray.inference import InferenceError, load_model, parse_sweep, read_image, to_rgb8
from tests.cli_helpers import run_module
from tests.inference_fixtures import (
    TINY_IMAGE_SIZE,
    aligned_face,
    cli_args,
    insightface_image,
    needs_dlib,
    write_rgb,
)

TOM = "Tom_Hanks_54745.png"  # InsightFace's aligned 112 px sample: a "photo" for a 32 px model


def _run(capsys, *flags: str, **options) -> tuple[int, str, str]:
    """generate.main in-process; ``options`` become ``--key value`` (lists: repeated)."""
    code = generate.main(cli_args(*flags, **options))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _source_yaw(text: str) -> float:
    return float(text.split("source pose yaw ")[1].split(",")[0])


@pytest.fixture
def crop(tmp_path: Path) -> Path:
    return write_rgb(tmp_path / "crop.png", aligned_face())


# --------------------------------------------------------------------------- parsing


def test_parse_sweep_forms_and_errors():
    assert parse_sweep("yaw=-60:60:30").values == (-60, -30, 0, 30, 60)
    assert parse_sweep("pitch=20:-20:-20").values == (20, 0, -20)
    assert parse_sweep("roll=-5,0,5").values == (-5, 0, 5)
    assert parse_sweep("yaw=0:10:4").values == (0, 4, 8)  # stop included only when hit
    for bad in ("tilt=0:1:1", "yaw=0:10:0", "yaw=0:10:-1", "yaw=a:b:c", "yaw", "yaw=0:1000:1"):
        with pytest.raises(InferenceError, match="--sweep"):
            parse_sweep(bad)


def test_sweep_targets_first_axis_fastest():
    sweeps = [parse_sweep("yaw=-30,30"), parse_sweep("pitch=-10,10")]
    targets = generate.sweep_targets(sweeps, (0.0, 0.0, 5.0))
    assert targets == [(-30, -10, 5), (30, -10, 5), (-30, 10, 5), (30, 10, 5)]


# --------------------------------------------------------------------------- happy paths


def test_aligned_crop_matches_the_model(tiny_checkpoint, crop, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, text, err = _run(
        capsys, checkpoint=tiny_checkpoint, image=crop, yaw=30, out=out, device="cpu"
    )
    assert code == 0, err
    assert "source pose yaw +0.0, pitch +0.0, roll +0.0 (aligned crop" in text
    got = read_image(out)
    assert got.shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    # Reference path written out independently: RGB, CHW, pixel / 127.5 - 1.
    x = torch.from_numpy(aligned_face()).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    with torch.no_grad():
        ref = load_model(tiny_checkpoint).model.generate(
            x, torch.zeros(1, 3), torch.tensor([[30.0, 0.0, 0.0]])
        )
    np.testing.assert_array_equal(got, to_rgb8(ref[0].numpy()))


def test_source_pose_flags_change_the_output(tiny_checkpoint, crop, tmp_path, capsys):
    outs = []
    for src in (0, 40):
        out = tmp_path / f"src{src}.png"
        code, text, _ = _run(
            capsys, checkpoint=tiny_checkpoint, image=crop, source_yaw=src, out=out
        )
        assert code == 0 and f"yaw {src:+.1f}" in text
        outs.append(read_image(out).astype(int))
    assert np.abs(outs[0] - outs[1]).max() > 0  # the pose reaches the control branch


def test_photo_with_landmarks_is_aligned_and_pose_estimated(tiny_checkpoint, tmp_path, capsys):
    lm = ",".join(f"{v:.2f}" for v in ARCFACE_TEMPLATE_112.ravel())
    out = tmp_path / "out.png"
    code, text, err = _run(
        capsys,
        checkpoint=tiny_checkpoint,
        image=insightface_image(TOM),
        landmarks=lm,
        source_roll=3,
        out=out,
    )
    assert code == 0, err
    assert "estimated from --landmarks" in text and "partly overridden" in text
    assert abs(_source_yaw(text)) < 5  # the template face is frontal
    assert "roll +3.0" in text
    assert read_image(out).shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)


def test_a_photo_is_estimated_as_its_training_data_were(tiny_checkpoint, tmp_path, capsys):
    """The checkpoint carries its data's single-image estimate (mean face, bias, train-split
    pose range; from the shard manifest); generate estimates a photo's pose with it -- the
    function preparation's single-image estimates call -- and a checkpoint without it with the
    defaults."""
    from controlnet_ray.data.pose import PhotoPoseModel

    stored = PhotoPoseModel.from_dict(load_model(tiny_checkpoint).pose_estimate)
    assert stored.trained_range_deg is not None and stored.trained_range_deg["yaw"][1] > 20
    dataset = PhotoPoseModel(stored.mean_face * [1.0, 0.9, 1.2], (2.0, -3.0, 1.0))
    lm = np.array([[203.2, 101.5], [246.5, 104.2], [225.0, 127.0], [201.0, 139.0], [246.0, 141.0]])
    photo = write_rgb(tmp_path / "photo.png", np.full((512, 512, 3), 128, np.uint8))
    flat = ",".join(f"{v:.1f}" for v in lm.ravel())
    printed = []
    for fields, model in ((dataset.to_dict(), dataset), (None, PhotoPoseModel.default())):
        path = _checkpoint_with(tiny_checkpoint, tmp_path, fields)
        code, text, err = _run(
            capsys, checkpoint=path, image=photo, landmarks=flat, out=tmp_path / "o.png"
        )
        assert code == 0, err
        yaw, pitch, roll = model.estimate(lm, 512, 512)
        printed.append(f"source pose yaw {yaw:+.1f}, pitch {pitch:+.1f}, roll {roll:+.1f}")
        assert printed[-1] in text
    assert printed[0] != printed[1]


def _checkpoint_with(checkpoint: Path, tmp_path: Path, pose_estimate: dict | None) -> Path:
    """A copy of ``checkpoint`` with another ``pose_estimate`` (None: none, as older runs
    wrote them)."""
    from controlnet_ray.checkpoint import load_checkpoint
    from controlnet_ray.checkpoint.contents import content_digest
    from controlnet_ray.checkpoint.format import CONTENT_DIGEST_KEY, POSE_ESTIMATE_KEY
    from controlnet_ray.files import atomic_save

    state = load_checkpoint(checkpoint)
    del state[POSE_ESTIMATE_KEY], state[CONTENT_DIGEST_KEY]
    if pose_estimate is not None:
        state[POSE_ESTIMATE_KEY] = pose_estimate
    state[CONTENT_DIGEST_KEY] = content_digest(state)
    return atomic_save(state, tmp_path / ("old.pth" if pose_estimate is None else "new.pth"))


def test_poses_beyond_the_trained_range_are_warned_about(tiny_checkpoint, crop, tmp_path, capsys):
    """Beyond the checkpoint's own training poses (its train split), or, for a checkpoint that
    does not know them, beyond the documented range: a warning naming the axis; within: none."""
    from controlnet_ray.inference import DOCUMENTED_TRAINED_RANGE_DEG

    trained = _trained_ranges(tiny_checkpoint)
    out = tmp_path / "o.png"
    beyond = trained["yaw"][1] + 5.0
    code, _, err = _run(capsys, checkpoint=tiny_checkpoint, image=crop, out=out, yaw=beyond)
    assert code == 0 and "warning: requested poses beyond those the model was trained on" in err
    assert f"yaw {beyond:+g} (trained" in err and "checkpoint's training data" in err
    code, _, err = _run(capsys, checkpoint=tiny_checkpoint, image=crop, out=out, yaw=0)
    assert code == 0 and "warning" not in err
    old = _checkpoint_with(tiny_checkpoint, tmp_path, None)
    roll = DOCUMENTED_TRAINED_RANGE_DEG["roll"][1] + 10.0
    code, _, err = _run(capsys, checkpoint=old, image=crop, out=out, sweep=[f"roll=0,{roll:g}"])
    assert code == 0 and f"roll {roll:+g} (trained -20..+20)" in err and "documented" in err


def _trained_ranges(checkpoint: Path) -> dict:
    from controlnet_ray.data.pose import PhotoPoseModel

    return PhotoPoseModel.from_dict(load_model(checkpoint).pose_estimate).trained_range_deg


def test_aligned_flag_resizes_a_larger_crop(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, text, _ = _run(
        capsys, "--aligned", checkpoint=tiny_checkpoint, image=insightface_image(TOM), out=out
    )
    assert code == 0 and "aligned crop" in text
    assert read_image(out).shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)


@needs_dlib
def test_photo_detected_with_dlib(tiny_checkpoint, tmp_path, capsys):
    from skimage import data

    photo = write_rgb(tmp_path / "astronaut.jpg", np.ascontiguousarray(data.astronaut()))
    out = tmp_path / "out.png"
    code, text, err = _run(
        capsys, checkpoint=tiny_checkpoint, image=photo, detector="dlib", out=out
    )
    assert code == 0, err
    assert "estimated from detected landmarks" in text
    assert abs(_source_yaw(text)) < 45


def test_sweep_grid_and_gif(tiny_checkpoint, crop, tmp_path, capsys):
    out = tmp_path / "turn.png"
    sweeps = ["yaw=-60:60:30", "pitch=-20:20:20"]
    code, _, err = _run(capsys, checkpoint=tiny_checkpoint, image=crop, out=out, sweep=sweeps)
    assert code == 0, err
    grid = read_image(out)
    tile_h, tile_w = 96 + 14, 96  # tiles are upscaled to >= 96 px, plus a caption strip
    assert grid.shape[0] == 3 * (tile_h + 2) + 2  # one row per pitch
    assert grid.shape[1] == 6 * (tile_w + 2) + 2  # source + 5 yaws
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.n_frames == 2 * 15 - 2  # there and back


def test_batch_mode_continues_past_bad_files(tiny_checkpoint, tmp_path, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    write_rgb(src / "a.png", aligned_face())
    write_rgb(src / "b.jpg", aligned_face()[::-1].copy())
    (src / "broken.png").write_bytes(b"\x89PNG garbage")
    (src / "notes.txt").write_text("ignored")
    code, text, err = _run(capsys, checkpoint=tiny_checkpoint, image=src, out=dst)
    assert code == 1
    assert sorted(p.name for p in dst.iterdir()) == ["a.png", "b.png"]
    assert "FAILED" in err and "broken.png" in err and "not a readable image" in err
    assert "done: 2 of 3 images, 1 failed" in text


def test_onnx_runner_matches_pytorch(tiny_checkpoint, tiny_onnx, crop, tmp_path, capsys):
    outs = []
    for ckpt in (tiny_checkpoint, tiny_onnx):
        out = tmp_path / f"{Path(ckpt).suffix[1:]}.png"
        code, text, err = _run(capsys, checkpoint=ckpt, image=crop, yaw=-45, out=out)
        assert code == 0, err
        outs.append(read_image(out).astype(int))
    assert "onnxruntime" in text
    assert np.abs(outs[0] - outs[1]).max() <= 1  # fp32 rounding may flip one level


# --------------------------------------------------------------------------- bad input


def test_unreadable_image(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "face.jpg"
    bad.write_text("this is not an image")
    code, _, err = _run(capsys, checkpoint=tiny_checkpoint, image=bad, out=tmp_path / "o.png")
    assert code == 2 and str(bad) in err and "not a readable image" in err


@needs_dlib
def test_no_face_found(tiny_checkpoint, tmp_path, capsys):
    flat = write_rgb(tmp_path / "wall.png", np.full((120, 160, 3), 128, np.uint8))
    code, _, err = _run(
        capsys, checkpoint=tiny_checkpoint, image=flat, detector="dlib", out=tmp_path / "o.png"
    )
    assert code == 2 and "no face found" in err and "--landmarks" in err


def test_no_detector_available_says_what_to_pass(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(detect, "dlib_available", lambda: False)
    photo = write_rgb(tmp_path / "photo.png", np.full((120, 160, 3), 128, np.uint8))
    code, _, err = _run(capsys, checkpoint=tiny_checkpoint, image=photo, out=tmp_path / "o.png")
    assert code == 2 and "--landmarks x1,y1,...,x5,y5" in err and "--aligned" in err


@pytest.mark.parametrize(
    "content",
    [lambda: torch.randn(3), lambda: {"weights": torch.randn(2)}],
    ids=["tensor", "dict-without-our-keys"],
)
def test_checkpoint_of_the_wrong_kind(content, crop, tmp_path, capsys):
    ckpt = tmp_path / "other.pth"
    torch.save(content(), ckpt)
    code, _, err = _run(capsys, checkpoint=ckpt, image=crop, out=tmp_path / "o.png")
    assert code == 2 and str(ckpt) in err and "not a controlnet checkpoint" in err


def test_foreign_onnx_is_refused(tiny_onnx, crop, tmp_path, capsys):
    import onnx

    model = onnx.load(str(tiny_onnx))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    code, _, err = _run(capsys, checkpoint=foreign, image=crop, out=tmp_path / "o.png")
    assert code == 2 and str(foreign) in err and "controlnet_ray.export" in err


@pytest.mark.parametrize(
    "option",
    [{"yaw": 120}, {"pitch": -61}, {"source_roll": 75}, {"sweep": ["yaw=-100:0:50"]}],
    ids=["yaw", "pitch", "source_roll", "sweep"],
)
def test_out_of_range_angles_are_refused(option, tiny_checkpoint, crop, tmp_path, capsys):
    out = tmp_path / "o.png"
    code, _, err = _run(capsys, checkpoint=tiny_checkpoint, image=crop, out=out, **option)
    assert code == 2 and "outside the range a model accepts" in err and "not clamped" in err
    assert not out.exists()


def test_output_in_a_missing_folder(tiny_checkpoint, crop, tmp_path, capsys):
    out = tmp_path / "nope" / "o.png"
    code, _, err = _run(capsys, checkpoint=tiny_checkpoint, image=crop, out=out)
    assert code == 2 and "does not exist" in err and str(out.parent) in err
    assert not out.parent.exists()
    missing = tmp_path / "missing_dir"
    code, _, err = _run(capsys, checkpoint=tiny_checkpoint, image=crop.parent, out=missing)
    assert code == 2 and "existing output folder" in err and not missing.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_an_error(tiny_checkpoint, crop, tmp_path, capsys):
    code, _, err = _run(
        capsys, checkpoint=tiny_checkpoint, image=crop, out=tmp_path / "o.png", device="cuda"
    )
    assert code == 2 and "--device cuda" in err


def test_onnx_on_cuda_without_the_gpu_runtime_is_an_error(tiny_onnx, crop, tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    code, _, err = _run(
        capsys, checkpoint=tiny_onnx, image=crop, out=tmp_path / "o.png", device="cuda"
    )
    assert code == 2 and "CUDAExecutionProvider" in err and "onnxruntime-gpu" in err


def test_subprocess_smoke(tiny_onnx, crop, tmp_path):
    out = tmp_path / "sweep.png"
    argv = cli_args(checkpoint=tiny_onnx, image=crop, sweep=["yaw=-30:30:30"], out=out)
    proc = run_module("generate", *argv, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and out.with_suffix(".gif").is_file()


@pytest.mark.slow
def test_checkpoint_trained_on_an_arcface_onnx_loads_without_it(tmp_path):
    """--encoder_weights *.onnx builds a BN-folded iresnet; loading must rebuild that form,
    also where the .onnx file is gone (another machine)."""
    import warnings

    from controlnet_ray.checkpoint import build_checkpoint
    from controlnet_ray.config import DataConfig, ModelConfig, TrainConfig
    from controlnet_ray.files import atomic_save
    from controlnet_ray.model import build_model, iresnet, model_signature

    torch.manual_seed(0)
    net = iresnet(18, input_size=32).eval()
    with torch.no_grad():  # distinct values, like trained weights (no shared constants)
        for m in net.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.PReLU)):
                for t in (*m.parameters(), *m.buffers()):
                    if t.is_floating_point():
                        t.uniform_(0.5, 1.5)
    arcface = tmp_path / "arcface.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, 32, 32),),
            str(arcface),
            dynamo=False,
            input_names=["data"],
            opset_version=11,  # what the model package's ONNX loader is tested with
        )
    mcfg = ModelConfig(
        image_size=32,
        feature_dim=16,
        base_channels=8,
        encoder="iresnet",
        iresnet_depth=18,
        encoder_weights=str(arcface),
    )
    cfg = TrainConfig(data=DataConfig(image_size=mcfg.image_size), model=mcfg)
    model = build_model(mcfg).eval()
    assert "encoder.backbone.conv1.bias" in model.state_dict()  # the fused form
    state = build_checkpoint(
        epoch=0,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scheduler=None,
        cfg=cfg,
        model_signature=model_signature(mcfg),
        best_val_loss=1.0,
        best_val_psnr=0.0,
        train_history=[],
        val_history=[],
    )
    ckpt = atomic_save(state, tmp_path / "best_model.pth")
    arcface.unlink()
    loaded = load_model(ckpt)
    x, pose = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([[10.0, 0, 0], [-20, 5, 0]])
    with torch.no_grad():
        ref = model.generate(x, pose, pose.flip(0))
        torch.testing.assert_close(loaded.model.generate(x, pose, pose.flip(0)), ref)
