"""Checks the driver makes before Ray starts: a re-run's flags against its Ray run's latest
checkpoint, output folders that cannot be written, and what a run joining a cluster leaves for
after the connection. Real files, no Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from controlnet_ray import checkpoint as ckpt
from controlnet_ray import files, launcher, run_files
from controlnet_ray.cli import parse_train_args
from controlnet_ray.config import ConfigError, TrainConfig
from tests.test_checkpoint import SIGNATURE, _setup


def _cfg(tmp_path: Path, *flags: str) -> TrainConfig:
    args = ["--save_dir", str(tmp_path / "ck"), "--epochs", "3", *flags]
    return launcher.absolute_paths(parse_train_args(args))


def _ray_run(cfg: TrainConfig, epoch: int = 3, nan: bool = False) -> Path:
    """A Ray run folder as Ray Train v2 leaves it: snapshot + registered checkpoint + state."""
    model, opt, sched = _setup(0)
    state = ckpt.build_checkpoint(
        epoch=epoch, model=model, optimizer=opt, scheduler=sched, cfg=cfg,
        model_signature=SIGNATURE, best_val_loss=0.5, best_val_psnr=20.0,
        train_history=[], val_history=[],
    )  # fmt: skip
    if nan:  # as written before non-finite weights were refused
        state["model_state_dict"]["control.0.bias"][0] = float("nan")
        state.pop(ckpt.CONTENT_DIGEST_KEY)
    run_dir = Path(cfg.storage_path()) / cfg.run_name()
    files.atomic_save(state, run_dir / "checkpoint_2026-01-01_00-00-03" / run_files.RAY_STATE_FILE)
    snapshot = {
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-03"}
    }
    (run_dir / launcher.RAY_SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    return run_dir


def test_same_flags_continue_silently(tmp_path: Path, capsys) -> None:
    cfg = _cfg(tmp_path)
    _ray_run(cfg)
    launcher.check_rerun(_cfg(tmp_path, "--progress", "lines", "--num_to_keep", "5"))
    assert capsys.readouterr().out == ""


def test_changed_settings_are_another_run_of_the_same_save_dir(tmp_path: Path) -> None:
    """The run is --save_dir and the settings: other settings name another Ray run (so nothing
    is continued with them), a longer --epochs or a console flag the same one."""
    base = _cfg(tmp_path)
    _ray_run(base)
    assert _cfg(tmp_path, "--lr", "5e-3").run_name() != base.run_name()
    assert _cfg(tmp_path, "--loss_type", "l1").run_name() != base.run_name()
    for same in (("--epochs", "9"), ("--progress", "lines"), ("--log_dir", str(tmp_path / "l"))):
        assert _cfg(tmp_path, *same).run_name() == base.run_name(), same
    launcher.check_rerun(_cfg(tmp_path, "--epochs", "4", "--lr", "5e-3", "--batch_size", "8"))


def test_a_named_run_with_changed_flags_stops_naming_each_difference_and_the_ways_out(
    tmp_path: Path,
) -> None:
    """--run_name fixes the run whatever the settings: continuing it with others would mix
    them, so the re-run stops before Ray, naming each difference."""
    _ray_run(_cfg(tmp_path, "--run_name", "mine"))
    with pytest.raises(ConfigError) as exc:
        launcher.check_rerun(
            _cfg(tmp_path, "--run_name", "mine", "--epochs", "4", "--lr", "5e-3",
                 "--batch_size", "8")
        )  # fmt: skip
    msg = str(exc.value)
    assert "--lr 0.0001 -> 0.005" in msg and "--batch_size 16 -> 8" in msg
    assert "--epochs" not in msg.split("settings:")[1].split(".")[0]  # extending is fine
    assert "--fresh" in msg and "new --save_dir" in msg and "--resume" in msg
    assert "\n" not in msg


def test_longer_epochs_continue_and_say_so(tmp_path: Path, capsys) -> None:
    _ray_run(_cfg(tmp_path))
    launcher.check_rerun(_cfg(tmp_path, "--epochs", "5"))
    assert "--epochs 3 -> 5: continuing to epoch 5" in capsys.readouterr().out


def test_fewer_epochs_than_already_trained_stop(tmp_path: Path) -> None:
    _ray_run(_cfg(tmp_path), epoch=3)
    with pytest.raises(ConfigError, match=r"--epochs 3 -> 2 \(the run already completed epoch 3"):
        launcher.check_rerun(_cfg(tmp_path, "--epochs", "2"))


def test_fresh_ignores_the_old_run(tmp_path: Path) -> None:
    _ray_run(_cfg(tmp_path))
    launcher.check_rerun(_cfg(tmp_path, "--lr", "5e-3", "--fresh"))


def test_a_run_whose_state_is_nan_stops_before_ray_naming_the_file(tmp_path: Path) -> None:
    run_dir = _ray_run(_cfg(tmp_path), nan=True)
    with pytest.raises(ConfigError, match="non-finite weights") as exc:
        launcher.check_rerun(_cfg(tmp_path))
    assert str(run_dir) in str(exc.value) and "--fresh" in str(exc.value)


def test_plan_rerun_free_fields_and_newer_configs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    state = {"epoch": 2, "config": cfg.to_dict()}
    moved = dataclasses.replace(cfg.output, log_dir=str(tmp_path / "other"), save_interval=1)
    plan = ckpt.plan_rerun(state, dataclasses.replace(cfg, output=moved))
    assert plan.conflicts == [] and plan.notes == []
    future = cfg.to_dict()
    future["optim"]["new_knob"] = 1.0
    plan = ckpt.plan_rerun({"epoch": 2, "config": future}, cfg)
    assert plan.conflicts and "new_knob" in plan.conflicts[0]


# --------------------------------------------------------------------------- output folders


def test_save_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--save_dir .*/f is not a folder"):
        launcher.check_writable_dir(tmp_path / "f", "--save_dir")
    with pytest.raises(ConfigError, match=r"--log_dir .*/f/logs is not a folder \(.*/f is a file"):
        launcher.check_writable_dir(tmp_path / "f" / "logs", "--log_dir")


def test_writable_dir_is_created(tmp_path: Path) -> None:
    launcher.check_writable_dir(tmp_path / "a" / "b", "--cache_dir")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


def test_output_dirs_cover_every_local_folder(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "--storage_path", "s3://bucket/x", "--cache_dir", str(tmp_path / "c"))
    flags = [flag for flag, _ in launcher.output_dirs(cfg)]
    assert flags == ["--save_dir", "--log_dir", "--cache_dir"]


def test_load_of_saved_state_round_trips_the_digest(tmp_path: Path) -> None:
    run_dir = _ray_run(_cfg(tmp_path))
    state = ckpt.load_checkpoint(launcher.latest_ray_checkpoint(run_dir))
    assert isinstance(state[ckpt.CONTENT_DIGEST_KEY], str) and torch.is_tensor(
        state["model_state_dict"]["control.0.bias"]
    )


# --------------------------------------------------------------------------- leftovers


def test_unregistered_checkpoint_folders_are_pruned_after_a_run_not_before(
    tmp_path: Path,
) -> None:
    """Before Ray starts nothing is deleted: a killed driver's actors may still be registering
    the newest folder (a fresh-clone CI run caught a re-run deleting it under them). After the
    run, folders absent from Ray's record go and registered ones stay."""
    cfg = _cfg(tmp_path)
    run_dir = _ray_run(cfg)
    doc = json.loads((run_dir / launcher.RAY_SNAPSHOT_FILE).read_text())
    doc["checkpoint_results"] = [{"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-02"}]
    (run_dir / launcher.RAY_SNAPSHOT_FILE).write_text(json.dumps(doc))
    for name in ("checkpoint_2026-01-01_00-00-02", "checkpoint_2026-01-01_00-00-04"):
        (run_dir / name).mkdir()
        (run_dir / name / run_files.RAY_STATE_FILE).write_bytes(b"x" * 100)
    before = sorted(d.name for d in run_dir.glob("checkpoint_*") if d.is_dir())
    launcher.check_rerun(cfg)  # before Ray starts
    assert sorted(d.name for d in run_dir.glob("checkpoint_*") if d.is_dir()) == before
    launcher.prune_unregistered_checkpoints(run_dir)  # what run_training does after the fit
    left = sorted(d.name for d in run_dir.glob("checkpoint_*") if d.is_dir())
    assert left == ["checkpoint_2026-01-01_00-00-02", "checkpoint_2026-01-01_00-00-03"]


def test_nothing_is_pruned_without_a_record_naming_checkpoints(tmp_path: Path) -> None:
    """A missing record, or one that names no checkpoint (a Ray that records runs otherwise),
    says nothing about which folders are stale: every checkpoint folder stays."""
    run_dir = _ray_run(_cfg(tmp_path))
    (run_dir / launcher.RAY_SNAPSHOT_FILE).write_text(json.dumps({"renamed": []}))
    assert launcher.prune_unregistered_checkpoints(run_dir) == []
    (run_dir / launcher.RAY_SNAPSHOT_FILE).unlink()
    assert launcher.prune_unregistered_checkpoints(run_dir) == []
    assert [d.name for d in run_dir.glob("checkpoint_*")] == ["checkpoint_2026-01-01_00-00-03"]


def test_nothing_is_pruned_on_an_unreadable_record(tmp_path: Path) -> None:
    run_dir = _ray_run(_cfg(tmp_path))
    (run_dir / launcher.RAY_SNAPSHOT_FILE).write_text("{truncated")
    (run_dir / "checkpoint_x").mkdir()
    assert launcher.prune_unregistered_checkpoints(run_dir) == []
    assert (run_dir / "checkpoint_x").is_dir()


def test_against_a_cluster_what_is_not_cached_waits_for_the_connection(
    tmp_path: Path, capsys
) -> None:
    """``check_data(defer_preparation=True)`` (a run joining a cluster) reads and checks the
    data, then leaves to the connection whatever is not cached: the shards, then the judges
    (trained here by the local path of ``train_judges``); with both cached the data is ready
    before Ray."""
    from controlnet_ray.judging import judge_files
    from tests.datasets import make_legacy_fixture

    fx = make_legacy_fixture(tmp_path / "repo")
    cache = tmp_path / "c"
    flags = ("--data_dir", str(fx.data_dir), "--cache_dir", str(cache), "--image_size", "64")
    cfg = _cfg(tmp_path, *flags)
    data = launcher.check_data(cfg, defer_preparation=True)
    assert data.shards is None and not (cache / "shards").exists()
    assert "shards: not prepared yet" in capsys.readouterr().out
    shards = data.source.ensure()
    data = launcher.check_data(cfg, defer_preparation=True)
    assert data.shards is None and "judges: not trained yet" in capsys.readouterr().out
    no_judge = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, no_judge=True))
    assert launcher.check_data(no_judge, defer_preparation=True).shards == shards
    launcher.train_judges(cfg, shards)  # no Ray here: trained in this process
    assert sorted((cache / "judges").glob("*.pt")) == sorted(judge_files(shards, cache))
    capsys.readouterr()
    assert launcher.check_data(cfg, defer_preparation=True).shards == shards
    assert "judge: reusing" in capsys.readouterr().out


# --------------------------------------------------------------------------- a new run's files


def _leave_files(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(name)


RUN_FILES = [
    "best_model.pth",
    "final_model.pth",
    "checkpoint_epoch_10.pth",
    "training_history.json",
]


def test_a_new_run_sets_the_previous_runs_files_aside_and_says_why(tmp_path: Path, capsys) -> None:
    first = _cfg(tmp_path)
    launcher.set_aside_other_runs(first)  # a first run: nothing to move, the folders recorded
    assert capsys.readouterr().out == ""
    save, logs = Path(first.output.save_dir), Path(first.output.log_dir)
    _leave_files(save, [*RUN_FILES, "notes.txt"])
    _leave_files(logs, ["events.out.tfevents.1.host"])
    launcher.set_aside_other_runs(first)  # the same run again: nothing moves
    assert sorted(p.name for p in save.iterdir() if p.name != run_files.RUN_RECORD) == sorted(
        [*RUN_FILES, "notes.txt"]
    )

    second = _cfg(tmp_path, "--loss_type", "l1")
    moved = launcher.set_aside_other_runs(second)
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "--loss_type mse -> l1" in out
    assert [m.parent for m in moved] == [save.parent, logs.parent]
    assert moved[0].name.startswith(save.name + ".") and moved[1].name.startswith(logs.name + ".")
    assert sorted(p.name for p in moved[0].iterdir()) == sorted(RUN_FILES)
    assert [p.name for p in moved[1].iterdir()] == ["events.out.tfevents.1.host"]
    assert (save / "notes.txt").is_file()  # a user's own file stays
    assert not any(run_files.is_save_dir_file(p.name) for p in save.iterdir())
    assert launcher.read_run_record(save)["run_name"] == second.run_name()
    assert launcher.read_run_record(logs)["run_name"] == second.run_name()

    _leave_files(save, RUN_FILES)  # the second run's files; back to the first settings
    again = launcher.set_aside_other_runs(first)
    assert (
        len(again) == 1
        and again[0] != moved[0]
        and "--loss_type l1 -> mse" in (capsys.readouterr().out)
    )


def test_files_without_a_record_are_set_aside_too(tmp_path: Path, capsys) -> None:
    """The original script's outputs carry no record: never overwritten, moved aside."""
    cfg = _cfg(tmp_path, "--log_dir", str(tmp_path / "ck"))  # one folder for both
    _leave_files(tmp_path / "ck", ["best_model.pth", "events.out.tfevents.7.x"])
    moved = launcher.set_aside_other_runs(cfg)
    assert len(moved) == 1
    assert sorted(p.name for p in moved[0].iterdir()) == [
        "best_model.pth", "events.out.tfevents.7.x"
    ]  # fmt: skip
    assert "no record of the settings" in capsys.readouterr().out
