"""Checkpoint files: exact resume, atomic writes, readable errors, the two-stage recipe."""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from controlnet_ray import checkpoint as ckpt
from controlnet_ray import files, run_files
from controlnet_ray.config import TrainConfig

SIGNATURE = {"encoder": "cnn", "depth": 0, "feature_dim": 8}
ORIGINAL_ARGS = {
    "data_dir", "image_dir", "batch_size", "num_workers", "image_size", "feature_dim", "pose_dim",
    "num_control_layers", "freeze_generator", "epochs", "lr", "weight_decay", "pose_loss_weight",
    "loss_type", "use_amp", "gradient_accumulation_steps", "resume", "save_dir", "log_dir",
    "save_interval",
}  # fmt: skip


class Tiny(nn.Module):
    """Stands in for ImageControlNet: a freezable ``generator`` and a ``control`` branch."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 2))
        self.control = nn.Sequential(nn.Linear(8, width), nn.Dropout(0.5), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(x) + self.control(x)


def _setup(seed: int, freeze_generator: bool = False, lr: float = 1e-3):
    torch.manual_seed(seed)
    model = Tiny()
    model.generator.requires_grad_(not freeze_generator)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return model, opt, sched


def _cfg(lr: float = 1e-3, freeze_generator: bool = False, epochs: int = 100) -> TrainConfig:
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.epochs = lr, 1e-5, epochs
    cfg.model.freeze_generator = freeze_generator
    return cfg


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched) -> float:
    """One step drawing from every RNG stream, so a missed restore changes the result."""
    scale = 1.0 + random.random() + float(np.random.rand())
    x, y = torch.randn(4, 8) * scale, torch.randn(4, 2)
    loss = nn.functional.mse_loss(model(x), y)  # dropout draws from torch's RNG too
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _save(tmp_path: Path, model, opt, sched, epoch: int = 2, cfg: TrainConfig | None = None):
    state = ckpt.build_checkpoint(
        epoch=epoch, model=model, optimizer=opt, scheduler=sched, cfg=cfg or _cfg(),
        model_signature=SIGNATURE, best_val_loss=0.5, best_val_psnr=np.float64(21.0),
        train_history=[{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": torch.tensor(0.9)}],
        val_history=[{"loss": 1.1, "psnr": 20.0}, {"loss": 1.0, "psnr": 21.0}],
        engine_state={"scaler": {"scale": 1024.0, "_growth_tracker": 3}},
    )  # fmt: skip
    return files.atomic_save(state, tmp_path / run_files.epoch_checkpoint(epoch))


class _EngineState:
    """Stands in for TrainEngine's ``load_state_dict``: records what the restore hands it."""

    def __init__(self) -> None:
        self.loaded: dict | None = None

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def _restore(
    state: dict, model, opt, sched, engine=None, cfg: TrainConfig | None = None, rank: int = 0
) -> ckpt.StartingPoint:
    """What ``loop.build_trainee`` does with a --resume file, in its order: weights
    (and the continue-or-warm-start decision) first, then, when continuing, the rest."""
    cfg = cfg or _cfg()
    start = ckpt.restore_weights(state, model, SIGNATURE, cfg, ckpt.trainable_names(model))
    if start.continuing:
        ckpt.restore_training_state(
            state,
            opt,
            sched,
            engine,
            rank=rank,
            seed=cfg.ray.seed,
            start_epoch=start.run.start_epoch,
        )
    return start


def test_round_trip_continues_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    _seed_all(0)
    model, opt, sched = _setup(0)
    reference = [_step(model, opt, sched) for _ in range(6)]
    reference_params = {k: v.clone() for k, v in model.state_dict().items()}

    _seed_all(0)
    model, opt, sched = _setup(0)
    first = [_step(model, opt, sched) for _ in range(3)]
    path = _save(tmp_path, model, opt, sched)
    del model, opt, sched
    _seed_all(123)  # a restarted process has other RNG streams and other initial weights
    model, opt, sched = _setup(7)

    state = ckpt.load_checkpoint(path)
    engine = _EngineState()
    start = _restore(state, model, opt, sched, engine)  # the worker's path, without Ray
    second = [_step(model, opt, sched) for _ in range(3)]

    assert start.continuing and start.run.start_epoch == 3
    assert first + second == reference
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference_params[name]), name
    assert engine.loaded == {"scaler": {"scale": 1024.0, "_growth_tracker": 3}}
    assert start.run.train_history == [
        {"epoch": 1, "loss": 1.0},
        {"epoch": 2, "loss": pytest.approx(0.9)},
    ]
    assert type(start.run.train_history[0]["epoch"]) is int
    assert (start.run.best_val_loss, start.run.best_val_psnr) == (0.5, 21.0)


def test_ray_checkpoint_always_continues_and_a_rank_without_streams_gets_its_own(
    tmp_path: Path,
) -> None:
    """A Ray checkpoint is this run's own (a restart): it continues even where --resume's plan
    would warm-start; a rank the file saved no streams for derives one (seed, rank, epoch)."""
    model, opt, sched = _setup(0)
    _step(model, opt, sched)
    state = ckpt.load_checkpoint(_save(tmp_path, model, opt, sched, epoch=4))
    other, opt2, sched2 = _setup(1, lr=5e-5)
    start = ckpt.restore_weights(
        state, other, SIGNATURE, _cfg(lr=5e-5), ckpt.trainable_names(other), "run/checkpoint_3"
    )
    assert start.continuing and start.run.start_epoch == 5
    assert start.message == (
        "resumed from Ray checkpoint run/checkpoint_3 at epoch 4 (continuing at epoch 5)"
    )
    assert start.run.val_history == [{"loss": 1.1, "psnr": 20.0}, {"loss": 1.0, "psnr": 21.0}]

    ckpt.restore_training_state(state, opt2, sched2, None, rank=1, seed=3, start_epoch=5)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched2.last_epoch == sched.last_epoch == 1
    got = torch.rand(3)
    ckpt.seed_rank_streams(3, 1, 5)
    assert torch.equal(got, torch.rand(3))


def test_file_has_original_keys_and_plain_weights_only_load(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    path = _save(tmp_path, model, opt, sched, epoch=4)
    raw = torch.load(path, weights_only=True)  # what a user of the original script does
    for key in (*ckpt.LEGACY_KEYS, "best_metric", "engine_state", "rng_state", "config",
                "model_signature", "trainable", "format_version"):  # fmt: skip
        assert key in raw, key
    assert set(raw["args"]) == ORIGINAL_ARGS
    assert raw["best_metric"] == "val_psnr_face" and raw["format_version"] == ckpt.FORMAT_VERSION
    assert type(raw["best_val_psnr"]) is float
    assert TrainConfig.from_dict(raw["config"]).optim.lr == pytest.approx(1e-3)
    assert raw["trainable"] == sorted(n for n, _ in model.named_parameters())
    given = ckpt.build_checkpoint(
        epoch=1, model=model, optimizer=opt, scheduler=None, cfg=_cfg(), model_signature={},
        best_val_loss=1.0, best_val_psnr=2.0, train_history=[], val_history=[],
        trainable=["control.0.weight", "a"],
    )  # fmt: skip
    assert given["trainable"] == ["a", "control.0.weight"] and given["scheduler_state_dict"] == {}


def test_legacy_args_match_the_original_flags() -> None:
    cfg = _cfg(lr=5e-5, freeze_generator=True)
    args = ckpt.legacy_args(cfg)
    assert set(args) == ORIGINAL_ARGS
    assert args["lr"] == 5e-5 and args["freeze_generator"] is True
    assert args["save_dir"] == "checkpoints_image"


def test_atomic_save_failure_mid_write_keeps_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "best_model.pth"
    files.atomic_save({"model_state_dict": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def half_then_crash(obj, f) -> None:
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match=r"cannot write .*best_model.pth: disk full"):
        files.atomic_save({"model_state_dict": {"w": torch.zeros(100_000)}}, path)
    monkeypatch.undo()

    assert torch.equal(ckpt.load_checkpoint(path)["model_state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def test_atomic_save_unpicklable_object_keeps_old_file(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    path = tmp_path / "final_model.pth"
    files.atomic_save({"model_state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(RuntimeError, match=r"cannot pickle"):
        files.atomic_save({"model_state_dict": {"w": torch.zeros(10_000)}, "x": Boom()}, path)
    assert torch.equal(ckpt.load_checkpoint(path)["model_state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["final_model.pth"]


def test_truncated_or_garbage_file_names_the_file(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    data = _save(tmp_path, model, opt, sched).read_bytes()
    cases = {"truncated.pth": data[: len(data) // 2], "text.pth": b"hello", "empty.pth": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ckpt.CheckpointError, match=r"corrupt or truncated") as err:
            ckpt.load_checkpoint(tmp_path / name)
        assert name in str(err.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match=r"not found: .*nope.pth"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"not a file"):
        ckpt.load_checkpoint(tmp_path)


def test_wrong_kind_of_file_names_missing_keys(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(tmp_path / "other.pth")
    msg = str(err.value)
    assert "other.pth" in msg and "model_state_dict" in msg and "optimizer_state_dict" in msg
    assert "missing keys" in msg and "epoch," not in msg.split("missing keys")[1].split("(")[0]

    torch.save(torch.ones(2), tmp_path / "tensor.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"tensor.pth.*holds a Tensor"):
        ckpt.load_checkpoint(tmp_path / "tensor.pth")


class NotAllowed:
    """A class weights_only loading must refuse."""


def test_untrusted_objects_are_refused_by_name(tmp_path: Path) -> None:
    torch.save({"model_state_dict": {}, "x": NotAllowed()}, tmp_path / "evil.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"evil.pth.*weights_only.*NotAllowed"):
        ckpt.load_checkpoint(tmp_path / "evil.pth")


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    torch.save({"model_state_dict": {}, "format_version": 99}, tmp_path / "future.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"future.pth.*format_version 99 is newer"):
        ckpt.load_checkpoint(tmp_path / "future.pth")


def test_original_script_file_with_namespace_and_numpy_loads(tmp_path: Path) -> None:
    model, opt, sched = _setup(0, freeze_generator=True)
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    legacy = {
        "epoch": 9, "model_state_dict": wrapped, "optimizer_state_dict": opt.state_dict(),
        "scheduler_state_dict": sched.state_dict(), "best_val_loss": np.float64(0.3),
        "best_val_psnr": np.float32(25.0), "train_metrics_history": [{"loss": np.float64(1)}],
        "val_metrics_history": [], "args": argparse.Namespace(lr=1e-4, freeze_generator=True),
    }  # fmt: skip
    torch.save(legacy, tmp_path / "best_model.pth")
    state = ckpt.load_checkpoint(tmp_path / "best_model.pth")
    assert state["format_version"] == ckpt.LEGACY_FORMAT_VERSION
    assert state["args"] == {"lr": 1e-4, "freeze_generator": True}
    assert type(state["best_val_psnr"]) is float and state["best_val_psnr"] == 25.0
    assert set(state["model_state_dict"]) == set(model.state_dict())  # "module." stripped
    fresh, _, _ = _setup(1)
    ckpt.check_model_compat(state, fresh, SIGNATURE)  # no signature in file: shapes only

    # Stage 2 of the original recipe from this file: generator unfrozen, lower lr.
    plan = ckpt.plan_resume(state, _cfg(lr=5e-5), ckpt.trainable_names(fresh))
    assert not plan.restore_optimizer and plan.start_epoch == 1
    assert "trainable set changed (4 -> 8 tensors)" in plan.reason
    assert "lr 0.0001 -> 5e-05" in plan.reason


def test_shape_mismatch_names_the_parameter(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    state = ckpt.load_checkpoint(_save(tmp_path, model, opt, sched))
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_model_compat(state, Tiny(width=32), SIGNATURE)
    msg = str(err.value)
    assert "checkpoint_epoch_2.pth does not fit" in msg
    assert "(checkpoint vs model): generator.0.weight: (16, 8) vs (32, 8); " in msg
    assert "; ... and 1 more" in msg  # 6 mismatching tensors, first 5 named


def test_signature_and_key_mismatches_are_named(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    state = ckpt.load_checkpoint(_save(tmp_path, model, opt, sched))
    other = dict(SIGNATURE, encoder="iresnet")
    with pytest.raises(ckpt.CheckpointError, match=r"encoder: checkpoint has 'cnn', this run "):
        ckpt.check_model_compat(state, model, other)

    # A key the file's signature lacks (added later) is not compared; one it has still is.
    ckpt.check_model_compat(state, model, dict(SIGNATURE, fill_seed="copy"))
    with pytest.raises(ckpt.CheckpointError, match=r"depth: checkpoint has 0, this run builds "):
        ckpt.check_model_compat(state, model, {k: v for k, v in SIGNATURE.items() if k != "depth"})

    bigger = Tiny()
    bigger.extra = nn.Linear(2, 2)
    del state["model_state_dict"]["control.2.bias"]
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_model_compat(state, bigger, SIGNATURE)
    assert "missing in checkpoint: control.2.bias; extra.weight; extra.bias" in str(err.value)
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected in checkpoint: generator.0.bias"):
        ckpt.check_model_compat(
            {"model_state_dict": {"generator.0.bias": torch.ones(16)}}, nn.Linear(1, 1), {}
        )


def test_plan_resume_same_settings_continues(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    state = ckpt.load_checkpoint(_save(tmp_path, model, opt, sched, epoch=5))
    plan = ckpt.plan_resume(state, _cfg(), ckpt.trainable_names(model))
    assert plan == ckpt.ResumePlan(
        True,
        f"resumed model, optimizer, scheduler, scaler and history from {state['_loaded_from']} "
        "at epoch 5",
        6,
    )
    more = ckpt.plan_resume(state, _cfg(epochs=6), ckpt.trainable_names(model))
    assert more.start_epoch == 6 and "nothing left" not in more.reason  # 1-based: epoch 6 to run
    done = ckpt.plan_resume(state, _cfg(epochs=5), ckpt.trainable_names(model))
    assert done.restore_optimizer and "nothing left to train" in done.reason


def test_plan_resume_two_stage_recipe_starts_fresh_optimizer(tmp_path: Path) -> None:
    cfg1 = _cfg(lr=1e-4, freeze_generator=True)
    model, opt, sched = _setup(0, freeze_generator=True, lr=1e-4)
    state = ckpt.load_checkpoint(_save(tmp_path, model, opt, sched, epoch=7, cfg=cfg1))

    stage2, opt2, sched2 = _setup(1, lr=5e-5)
    plan = ckpt.plan_resume(state, _cfg(lr=5e-5), ckpt.trainable_names(stage2))
    assert not plan.restore_optimizer and plan.start_epoch == 1 == ckpt.FRESH_START_EPOCH
    assert plan.reason.startswith(
        "trainable set changed (generator unfrozen: +4 tensors); lr 0.0001 -> 5e-05: "
        "fresh optimizer and schedule, weights loaded from "
    )
    assert "epoch counter restarts at 1" in plan.reason

    opt2_before = opt2.state_dict()
    start = _restore(state, stage2, opt2, sched2, cfg=_cfg(lr=5e-5))
    assert not start.continuing and start.message.endswith(plan.reason)
    assert start.run == ckpt.RunState(start_epoch=1)  # history and best metrics start empty
    assert opt2.state_dict() == opt2_before
    assert opt2.param_groups[0]["lr"] == 5e-5 and len(opt2.param_groups[0]["params"]) == 8
    assert torch.equal(stage2.generator[0].weight, model.generator[0].weight)

    refrozen = ckpt.plan_resume(state, cfg1, ckpt.trainable_names(model))
    assert refrozen.restore_optimizer
    wd_only = _cfg(lr=1e-4, freeze_generator=True)
    wd_only.optim.weight_decay = 0.01
    plan = ckpt.plan_resume(state, wd_only, ckpt.trainable_names(model))
    assert not plan.restore_optimizer and plan.reason.startswith("weight_decay 1e-05 -> 0.01")
    frozen = ckpt.plan_resume(state, cfg1, ["generator.0.weight"])
    assert "control frozen: -4 tensors" in frozen.reason and "+1 tensors" in frozen.reason


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    _seed_all(5)
    files.atomic_save({"rng": ckpt.capture_rng_state()}, tmp_path / "rng.pth")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    _seed_all(6)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


# --------------------------------------------------------------------------- integrity


def test_flipped_bytes_inside_a_weight_record_are_detected(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    path = _save(tmp_path, model, opt, sched)
    assert ckpt.CONTENT_DIGEST_KEY in ckpt.load_checkpoint(path)  # intact: loads
    raw = bytearray(path.read_bytes())
    weight = model.generator[0].weight.detach().numpy().tobytes()  # 512 bytes, stored as is
    at = raw.find(weight)
    assert at > 0 and raw.find(weight, at + 1) < 0  # exactly one place: inside the record
    raw[at : at + len(weight)] = bytes(b ^ 0xFF for b in raw[at : at + len(weight)])
    path.write_bytes(bytes(raw))
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(ckpt.CheckpointError, match="content hash mismatch") as exc:
        ckpt.load_checkpoint(path)
    assert str(path) in str(exc.value)


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    model, opt, sched = _setup(0)
    with torch.no_grad():
        model.control[2].bias[0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to save epoch 2.*control\.2\.bias"):
        _save(tmp_path, model, opt, sched)
    assert not list(tmp_path.iterdir())


def test_non_finite_weights_in_a_file_are_refused_at_load(tmp_path: Path) -> None:
    """Files written without the checks (the original script, older versions) are checked too."""
    path = tmp_path / "diverged.pth"
    sd = {"w": torch.ones(3), "b": torch.tensor([float("inf")]), "n": torch.tensor(3)}
    torch.save({"model_state_dict": sd, "epoch": 3}, path)
    with pytest.raises(ckpt.CheckpointError, match="non-finite weights") as exc:
        ckpt.load_checkpoint(path)
    assert str(path) in str(exc.value) and "b" in str(exc.value)


def test_full_disk_inside_torch_save_names_the_file(tmp_path, monkeypatch) -> None:
    """torch's zip writer reports ENOSPC as ``RuntimeError: [enforce fail at
    inline_container.cc:672] ...``, naming no file; the error must say which one."""

    def enospc(obj, f) -> None:
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", enospc)
    path = tmp_path / "final_model.pth"
    with pytest.raises(OSError, match=r"cannot write .*final_model\.pth: \[enforce fail"):
        files.atomic_save({"model_state_dict": {}}, path)
    assert list(tmp_path.iterdir()) == []
