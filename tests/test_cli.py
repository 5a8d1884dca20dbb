"""The original command line: both flag forms, defaults, and each invalid value."""

from __future__ import annotations

import dataclasses
import os
import re
import time
import typing
from pathlib import Path

import pytest
import yaml

from controlnet_ray.cli import parse_train_args
from controlnet_ray.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RayOptions,
    TrainConfig,
)
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


@pytest.mark.parametrize("module", ["train", "tune"])
def test_ray_train_v1_in_the_environment_is_refused_in_one_line_before_any_work(
    module: str, tmp_path: Path
):
    """RAY_TRAIN_V2_ENABLED=0 would fail later at ``from ray.train import UserCallback``."""
    out = ["--save_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "lg")]
    proc = run_module(module, *out, env={"RAY_TRAIN_V2_ENABLED": "0"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: RAY_TRAIN_V2_ENABLED=0 in the environment selects Ray Train v1; this project "
        "needs Train v2: unset RAY_TRAIN_V2_ENABLED or set it to 1"
    ]
    assert not (tmp_path / "ck").exists()  # nothing prepared, no Ray started


def test_every_ray_process_of_a_run_gets_train_v2_and_a_quiet_console(monkeypatch):
    """Unset here: pinned for this process and given to the cluster's job (whose nodes may
    say 0). Set here (a submitted job's runtime env): left to it, as Ray refuses a variable
    that both the job and ray.init set."""
    import logging

    from controlnet_ray.launcher.connection import run_runtime_env
    from controlnet_ray.progress import quiet_ray_notices

    monkeypatch.delenv("RAY_TRAIN_V2_ENABLED", raising=False)
    env = run_runtime_env(local=True)
    assert env["env_vars"] == {"RAY_TRAIN_V2_ENABLED": "1"}
    assert os.environ["RAY_TRAIN_V2_ENABLED"] == "1"
    assert run_runtime_env(local=False) == {}  # set now: not given twice; the job's hook
    hook = env["worker_process_setup_hook"]
    assert hook == f"{quiet_ray_notices.__module__}.{quiet_ray_notices.__name__}"
    notices = logging.getLogger("ray.data._internal.progress")
    monkeypatch.setattr(notices, "level", notices.level)  # restored after the test
    quiet_ray_notices()
    assert not notices.isEnabledFor(logging.WARNING)
    for name in ("runtime_env.yaml", "runtime_env.pip.yaml"):  # working_dir jobs (no image)
        job = yaml.safe_load((Path(__file__).parents[1] / "jobs" / name).read_text())
        assert job["worker_process_setup_hook"] == hook, name


def test_help_lists_every_original_flag():
    proc = run_module("train", "--help")
    assert proc.returncode == 0
    for _, name in ORIGINAL_DEFAULTS:
        assert f"--{name}" in proc.stdout


# --------------------------------------------------------------------------- config <-> CLI


def test_every_config_field_is_a_flag_with_its_default_and_help():
    """The parser is generated from the dataclasses: every described field is a flag whose
    default is the field's, and ``parse_train_args([])`` is exactly ``TrainConfig()``."""
    from controlnet_ray.cli import build_parser, flags
    from controlnet_ray.config import section_classes

    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for cls in section_classes().values():
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli") or f.metadata.get("shared"):
                continue
            action = actions[f.name]
            assert action.option_strings == [f"--{f.name}"]
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            assert action.default == default, f.name
            assert action.help, f.name
    assert {fl.name for fl in flags()} == set(actions) - {"help"}
    assert parse_train_args([]).to_dict() == TrainConfig().to_dict()
    assert "max_nonfinite_steps" not in actions  # a config field without a flag


def test_original_flags_come_first_in_their_own_groups():
    from controlnet_ray.cli import build_parser

    groups = [g for g in build_parser()._action_groups if g._group_actions]
    originals = [a.dest for g in groups if g.title.startswith("original") for a in g._group_actions]
    assert originals == [name for _, name in ORIGINAL_DEFAULTS]  # the original's order


def test_choices_come_from_the_literal_types(capsys):
    """Each choice list exists once (the Literal); help shows it and errors name it."""
    from controlnet_ray import config
    from controlnet_ray.cli import build_parser

    assert config.LOSS_TYPES == typing.get_args(config.LossType) == ("mse", "l1", "combined")
    assert config.IRESNET_DEPTHS == (18, 34, 50, 100)
    help_text = build_parser().format_help()
    for flag, allowed in [
        ("--loss_type", config.LOSS_TYPES),
        ("--iresnet_depth", config.IRESNET_DEPTHS),
        ("--progress", config.PROGRESS_MODES),
        ("--framing", config.FRAMINGS),
    ]:
        assert f"{flag} {{{','.join(map(str, allowed))}}}" in help_text
    with pytest.raises(SystemExit):
        parse_train_args(["--progress", "fancy"])
    assert "--progress must be one of {auto, bar, lines}, got 'fancy'" in capsys.readouterr().err
    assert parse_train_args(["--iresnet_depth", "18"]).model.iresnet_depth == 18


def test_one_image_size_flag_sets_data_and_model():
    cfg = parse_train_args(["image_size", "64"])
    assert cfg.data.image_size == cfg.model.image_size == 64
    with pytest.raises(ConfigError, match="--image_size: the model's input size 64 differs"):
        TrainConfig(model=ModelConfig(image_size=64))
    cfg.model.image_size = 128  # changed after construction: validate() sees it
    with pytest.raises(ConfigError, match="--image_size"):
        cfg.validate()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DataConfig(batch_size=0), "--batch_size must be > 0, got 0"),
        (lambda: DataConfig(split_ratios=(0.5, float("nan"), 0.5)), "--split_ratios must be a"),
        (lambda: ModelConfig(encoder="vit"), "--encoder must be one of {auto, iresnet,"),
        (lambda: ModelConfig(iresnet_depth=7), "--iresnet_depth must be one of {18, 34, 50"),
        (lambda: OptimConfig(lr=float("inf")), "--lr must be a finite number, got inf"),
        (lambda: OptimConfig(background_loss_weight=2.0), "--background_loss_weight must be in"),
        (lambda: OutputConfig(best_metric="psnr"), "--best_metric must be one of"),
        (lambda: RayOptions(resource_wait_s=-1.0), "--resource_wait_s must be >= 0, got -1"),
        (lambda: TrainConfig(data=DataConfig(framing="arcface")), "--generator warp needs"),
    ],
)
def test_sections_check_their_values_at_construction(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_stored_configs_load_without_touching_their_paths(tmp_path: Path):
    """A checkpoint's config names paths of the machine that wrote it: loading it checks
    values only; validate() (before a run) checks the paths."""
    stored = TrainConfig().to_dict()
    stored["data"]["data_dir"] = "/elsewhere/data"
    stored["output"]["resume"] = "/elsewhere/ck.pth"
    stored["data"]["split_ratios"] = [0.8, 0.1, 0.1]  # JSON has lists
    cfg = TrainConfig.from_dict(stored)
    assert cfg.data.split_ratios == (0.8, 0.1, 0.1) and cfg.data.data_dir == "/elsewhere/data"
    with pytest.raises(ConfigError, match="--data_dir does not exist"):
        cfg.validate()
    stored["optim"]["lr"] = -1.0
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        TrainConfig.from_dict(stored)
