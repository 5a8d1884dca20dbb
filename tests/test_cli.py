"""The original command line: both flag forms, defaults, and each invalid value."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from controlnet_ray.cli import parse_train_args
from tests.cli_helpers import run_module

ORIGINAL_DEFAULTS = {
    ("data", "data_dir"): None,
    ("data", "image_dir"): None,
    ("data", "batch_size"): 16,
    ("data", "num_workers"): 4,
    ("data", "image_size"): 112,
    ("model", "feature_dim"): 512,
    ("model", "pose_dim"): 3,
    ("model", "num_control_layers"): 3,
    ("model", "freeze_generator"): False,
    ("optim", "epochs"): 100,
    ("optim", "lr"): 1e-4,
    ("optim", "weight_decay"): 1e-5,
    ("optim", "pose_loss_weight"): 0.1,
    ("optim", "loss_type"): "mse",
    ("optim", "use_amp"): False,
    ("optim", "gradient_accumulation_steps"): 1,
    ("output", "resume"): None,
    ("output", "save_dir"): "checkpoints_image",
    ("output", "log_dir"): "logs_image",
    ("output", "save_interval"): 10,
}


def test_original_defaults():
    cfg = parse_train_args([])
    for (section, name), value in ORIGINAL_DEFAULTS.items():
        assert getattr(getattr(cfg, section), name) == value, name


def test_dashed_and_dashless_forms_agree(tmp_path: Path):
    data = str(tmp_path)
    dashed = parse_train_args(
        [
            "--data_dir",
            data,
            "--epochs",
            "100",
            "--batch_size",
            "16",
            "--lr",
            "1e-4",
            "--use_amp",
            "--freeze_generator",
            "--loss_type",
            "l1",
        ]
    )
    dashless = parse_train_args(
        [
            "data_dir",
            data,
            "epochs",
            "100",
            "batch_size",
            "16",
            "lr",
            "1e-4",
            "use_amp",
            "freeze_generator",
            "true",
            "loss_type",
            "l1",
        ]
    )
    assert dashed.to_dict() == dashless.to_dict()
    assert dashless.optim.use_amp and dashless.model.freeze_generator
    assert dashless.data.data_dir == data


def test_dashless_value_equal_to_a_flag_name_stays_a_value(tmp_path: Path):
    cfg = parse_train_args(["--save_dir", "epochs", "epochs", "3"])
    assert cfg.output.save_dir == "epochs" and cfg.optim.epochs == 3


def test_ray_options_and_stable_run_name(tmp_path: Path):
    args = ["--num_ray_workers", "2", "--save_dir", str(tmp_path / "ck"), "--seed", "7"]
    a, b = parse_train_args(args), parse_train_args(args)
    assert a.ray.num_ray_workers == 2 and a.ray.seed == 7
    assert a.run_name() == b.run_name()
    assert a.run_name() != parse_train_args(["--save_dir", str(tmp_path / "other")]).run_name()
    assert a.effective_batch_size() == 32


@pytest.mark.parametrize(
    ("argv", "flag", "detail"),
    [
        (["--batch_size", "0"], "--batch_size", "> 0"),
        (["--batch_size", "-4"], "--batch_size", "> 0"),
        (["--epochs", "0"], "--epochs", "> 0"),
        (["--lr", "0"], "--lr", "> 0"),
        (["--lr=-1e-4"], "--lr", "> 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps", "> 0"),
        (["--save_interval", "0"], "--save_interval", "> 0"),
        (["--loss_type", "huber"], "--loss_type", "mse, l1, combined"),
        (["--image_size", "100"], "--image_size", "divisible by 16"),
        (["--data_dir", "/nonexistent/dir"], "--data_dir", "/nonexistent/dir"),
        (["--bogus_flag", "1"], "--bogus_flag", "unrecognized"),
        (["bogus_key", "1"], "bogus_key", "unrecognized"),
        (["--resume", "/nonexistent/x.pth"], "--resume", "not found"),
        # NaN and inf pass `x < 0` / `not x > 0` checks; every float flag must be finite.
        (["--lr", "inf"], "--lr", "finite"),
        (["--lr", "nan"], "--lr", "finite"),
        (["--weight_decay", "nan"], "--weight_decay", "finite"),
        (["--pose_loss_weight", "nan"], "--pose_loss_weight", "finite"),
        (["--pose_loss_weight=-inf"], "--pose_loss_weight", "finite"),
        (["--identity_loss_weight", "nan"], "--identity_loss_weight", "finite"),
        (["--grad_clip", "inf"], "--grad_clip", "finite"),
        (["--max_pose_distance", "inf"], "--max_pose_distance", "finite"),
        (["--min_pose_distance", "nan"], "--min_pose_distance", "finite"),
        (["--split_ratios", "nan", "0.5", "0.5"], "--split_ratios", "nan 0.5 0.5"),
        (["--cpus_per_worker", "nan"], "--cpus_per_worker", "finite"),
    ],
)
def test_invalid_values_name_the_flag(argv, flag, detail, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and detail in err


def test_invalid_value_fails_fast_in_a_subprocess_before_ray():
    t0 = time.monotonic()
    proc = run_module("train", "--loss_type", "bogus")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2
    assert "--loss_type" in proc.stderr and "mse, l1, combined" in proc.stderr
    assert "ray" not in proc.stdout.lower()
    assert elapsed < 10  # generous bound for a loaded CI box; typically ~0.2 s


def test_help_lists_every_original_flag():
    proc = run_module("train", "--help")
    assert proc.returncode == 0
    for _, name in ORIGINAL_DEFAULTS:
        assert f"--{name}" in proc.stdout
