"""A run's storage: the original's files published to it and copied down to the driver.

Against a real S3-compatible server on loopback (moto) and a local folder; no Ray. The
outputs tests run rank 0's real code path (``RankZeroOutputs``): what the worker's training
thread writes and what Ray's upload thread publishes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from controlnet_ray import checkpoint as ckpt
from controlnet_ray import run_files
from controlnet_ray.config import TrainConfig
from controlnet_ray.outputs import RankZeroOutputs
from controlnet_ray.reporting import TensorBoardReporter
from controlnet_ray.storage import LOG_DIR, SAVE_DIR, RunStorage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path: Path) -> RunStorage:
    if request.param == "local":
        return RunStorage.open(str(tmp_path / "storage"), "run_a")
    make_uri = request.getfixturevalue("s3_server")
    return RunStorage.open(make_uri(f"{tmp_path.name}/storage"), "run_a")


def test_files_round_trip_and_copy_down_only_what_changed(storage: RunStorage, tmp_path):
    src = tmp_path / "growing.bin"
    src.write_bytes(b"flushed" + b"-partial")
    storage.put_file(src, storage.path(SAVE_DIR, "a.bin"), size=len(b"flushed"))
    storage.put_bytes(b"{}", storage.path(SAVE_DIR, "sub", "h.json"))
    storage.copy(storage.path(SAVE_DIR, "a.bin"), storage.path(SAVE_DIR, "b.bin"))
    local = tmp_path / "driver_save_dir"
    changed = storage.materialise(storage.path(SAVE_DIR), local)
    assert sorted(p.relative_to(local).as_posix() for p in changed) == [
        "a.bin",
        "b.bin",
        "sub/h.json",
    ]
    assert (local / "a.bin").read_bytes() == (local / "b.bin").read_bytes() == b"flushed"
    assert storage.materialise(storage.path(SAVE_DIR), local) == []  # nothing new
    storage.put_bytes(b'{"epoch": 2}', storage.path(SAVE_DIR, "sub", "h.json"))
    assert storage.materialise(storage.path(SAVE_DIR), local) == [local / "sub" / "h.json"]
    assert (local / "sub" / "h.json").read_text() == '{"epoch": 2}'
    assert not [p for p in local.rglob("*.tmp")]
    assert storage.materialise(storage.path("nothing_here"), tmp_path / "x") == []


def test_local_storage_links_instead_of_copying(tmp_path: Path) -> None:
    storage = RunStorage.open(str(tmp_path / "storage"), "run_a")
    storage.put_bytes(b"x" * 1000, storage.path("checkpoint_1", "state.pth"))
    storage.copy(storage.path("checkpoint_1", "state.pth"), storage.path(SAVE_DIR, "best.pth"))
    storage.materialise(storage.path(SAVE_DIR), tmp_path / "save")
    inodes = {
        os.stat(p).st_ino
        for p in (
            storage.path("checkpoint_1", "state.pth"),
            storage.path(SAVE_DIR, "best.pth"),
            tmp_path / "save" / "best.pth",
        )
    }
    assert len(inodes) == 1  # one file on disk, three names


def _history(epoch: int) -> list[dict]:
    return [{"epoch": e, "loss": 1.0 / e, "psnr": 10.0 + e} for e in range(1, epoch + 1)]


def _epoch(outputs: RankZeroOutputs, epoch: int, is_best: bool, reporter: TensorBoardReporter):
    names = run_files.epoch_names(epoch, epochs=2, save_interval=1, is_best=is_best)
    reporter.log_epoch(epoch, {"loss": 1.0 / epoch}, {"psnr": 10.0 + epoch})
    reporter.flush()
    model = torch.nn.Linear(3, 3)
    state = ckpt.build_checkpoint(
        epoch=epoch,
        model=model,
        optimizer=torch.optim.Adam(model.parameters()),
        scheduler=None,
        cfg=TrainConfig(),
        model_signature={},
        best_val_loss=1.0,
        best_val_psnr=11.0,
        train_history=_history(epoch),
        val_history=_history(epoch),
    )
    return outputs.write_epoch(epoch, state, names, _history(epoch), _history(epoch)), state


def test_an_epoch_is_serialised_once_and_published_under_the_original_names(
    storage: RunStorage, tmp_path: Path, monkeypatch
) -> None:
    outputs = RankZeroOutputs(storage, tmp_path / "scratch")
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: saves.append(1) or real_save(obj, f))
    with TensorBoardReporter(outputs.log_dir) as reporter:
        for epoch, best in ((1, True), (2, False)):
            files, state = _epoch(outputs, epoch, best, reporter)
            ckpt_path = outputs.publish(files, f"checkpoint_{epoch}")
            assert ckpt_path == storage.path(f"checkpoint_{epoch}")
            assert len(saves) == epoch  # one torch.save per epoch, whatever it derives
    local = tmp_path / "driver"
    storage.materialise(storage.path(SAVE_DIR), local / "save")
    storage.materialise(storage.path(LOG_DIR), local / "logs")
    expected = run_files.run_names(epochs=2, save_interval=1)
    assert {p.name for p in (local / "save").iterdir()} == expected
    best = ckpt.load_checkpoint(local / "save" / run_files.BEST_MODEL)
    final = ckpt.load_checkpoint(local / "save" / run_files.FINAL_MODEL)
    assert (best["epoch"], final["epoch"]) == (1, 2)  # epoch 2 was not the best
    assert torch.equal(final["model_state_dict"]["weight"], state["model_state_dict"]["weight"])
    doc = json.loads((local / "save" / run_files.HISTORY).read_text())
    assert [h["epoch"] for h in doc["val"]] == [1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(local / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("Epoch/ValPSNR")] == [1, 2]


def test_a_new_attempt_empties_what_a_killed_one_left(tmp_path: Path) -> None:
    left = tmp_path / "scratch" / "ray_checkpoints" / "epoch_3"
    left.mkdir(parents=True)
    (left / run_files.RAY_STATE_FILE).write_bytes(b"\0" * 1000)
    storage = RunStorage.open(str(tmp_path / "storage"), "run_a")
    outputs = RankZeroOutputs(storage, tmp_path / "scratch")
    assert not left.exists() and outputs.save_dir.is_dir() and outputs.log_dir.is_dir()


def test_join_uri_keeps_the_query_at_the_end() -> None:
    from controlnet_ray.storage import join_uri

    assert join_uri("/data/ray/", "run", SAVE_DIR) == "/data/ray/run/save_dir"
    assert (
        join_uri("s3://b/p?endpoint_override=h:1&scheme=http", "run")
        == "s3://b/p/run?endpoint_override=h:1&scheme=http"
    )


def test_the_driver_copies_the_run_down_when_fit_ends_and_keeps_a_failures_error(
    tmp_path: Path,
) -> None:
    from controlnet_ray.config import OutputConfig
    from controlnet_ray.launcher import absolute_paths, fit_with_outputs

    out = OutputConfig(save_dir=str(tmp_path / "ck"), log_dir=str(tmp_path / "logs"))
    cfg = absolute_paths(TrainConfig(output=out))
    storage = RunStorage.open(cfg.storage_path(), cfg.run_name())

    class PublishingTrainer:  # what rank 0 does during fit(), then fit's result
        def fit(self) -> str:
            storage.put_bytes(b"{}", storage.path(SAVE_DIR, run_files.HISTORY))
            storage.put_bytes(b"ev", storage.path(LOG_DIR, "events.out.tfevents.1"))
            return "result"

    class FailingTrainer:
        def fit(self) -> str:
            storage.put_bytes(b"x", storage.path(SAVE_DIR, run_files.BEST_MODEL))
            raise RuntimeError("worker died")

    assert fit_with_outputs(cfg, PublishingTrainer()) == "result"
    assert (tmp_path / "ck" / run_files.HISTORY).read_bytes() == b"{}"
    assert (tmp_path / "logs" / "events.out.tfevents.1").read_bytes() == b"ev"
    with pytest.raises(RuntimeError, match="worker died"):
        fit_with_outputs(cfg, FailingTrainer())
    assert (tmp_path / "ck" / run_files.BEST_MODEL).read_bytes() == b"x"  # what a failed run left
