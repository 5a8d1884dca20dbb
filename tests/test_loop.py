"""The whole per-worker loop in-process, without Ray (``loop.run_worker``).

Real parts throughout: the warp ImageControlNet (tiny), the engine, the one resume path,
``RankZeroOutputs`` publishing to a real run storage, TensorBoard files and curve PNGs. Only the
host is a stand-in for Ray Train: a world of one on the CPU whose batches are a few pairs of
the tiny synthetic dataset, and whose ``report`` publishes each checkpoint at once (Ray does it
on its upload thread) and keeps the latest, as Ray does, for the next attempt to start from.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from controlnet_ray import checkpoint as ckpt
from controlnet_ray import loop, run_files
from controlnet_ray.config import TrainConfig
from controlnet_ray.storage import LOG_DIR, SAVE_DIR
from tests.inference_fixtures import TinyData, _train_batch, tiny_config

EPOCHS, SAVE_INTERVAL = 4, 2
#: the data's single-image pose estimate as the driver passes it (data.pose.PhotoPoseModel)
POSE_ESTIMATE = {"mean_face": None, "bias_deg": [1.0, -2.0, 0.5], "trained_range_deg": None}


class WorkerDied(RuntimeError):
    """What the host raises to stop a run after a given report, as a killed worker would."""


class InProcessHost:
    """``loop.WorkerHost`` for one process: fixed batches, checkpoints published at once."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], die_after: int | None = None):
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")
        self._batches = batches
        self.die_after = die_after  # reports before the worker "dies" (None: never)
        self.latest: str | None = None  # the last published checkpoint folder, as Ray keeps
        self.reports: list[dict[str, Any]] = []
        self.copies: list[tuple[str, ...]] = []  # each saved epoch's names in --save_dir

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def starting_checkpoint(self) -> tuple[str | None, dict | None]:
        if self.latest is None:
            return None, None
        return self.latest, ckpt.load_checkpoint(Path(self.latest) / run_files.RAY_STATE_FILE)

    def batches(self, train: bool) -> list[dict[str, torch.Tensor]]:
        return self._batches

    def report(self, metrics: dict[str, Any], saved: loop.EpochCheckpoint | None) -> None:
        self.reports.append(metrics)
        if saved is not None:
            self.copies.append(saved.files.copies)
            self.latest = saved.publish(f"checkpoint_{len(self.reports):06d}")
        if len(self.reports) == self.die_after:
            self.die_after = None  # the next attempt lives
            raise WorkerDied(f"killed after report {len(self.reports)}")


@pytest.fixture(scope="module")
def pairs(tiny_data: TinyData) -> list[dict[str, torch.Tensor]]:
    """8 training pairs of the tiny synthetic dataset as two batches of 4, as the pipeline
    delivers them to a worker: uint8 [B, H, W, 3] images (the loop normalises them)."""
    from controlnet_ray.data.shards import ensure_shards

    cfg = tiny_config(tiny_data)
    batch = _train_batch(ensure_shards(cfg.data, num_workers=1), cfg)
    for k in ("source", "target"):  # exact: the floats came from uint8 pixels
        batch[k] = torch.round((batch[k] + 1) * 127.5).to(torch.uint8).movedim(1, -1)
    return [{k: v[i : i + 4] for k, v in batch.items()} for i in (0, 4)]


@pytest.fixture(autouse=True)
def _keep_threads():
    """run_worker sets torch's thread count for its process, here pytest's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _setup(tiny_data: TinyData, root: Path, epochs: int = EPOCHS) -> loop.WorkerSetup:
    """The tiny run, with the adversarial option on: its discriminator state takes the one
    resume path too."""
    base = tiny_config(tiny_data)
    cfg = TrainConfig(
        data=base.data,
        model=base.model,
        optim=dataclasses.replace(base.optim, epochs=epochs, adversarial_loss_weight=0.05),
        output=dataclasses.replace(
            base.output,
            save_dir=str(root / "ck"),
            log_dir=str(root / "logs"),
            save_interval=SAVE_INTERVAL,
            no_judge=True,
        ),
        ray=dataclasses.replace(base.ray, storage_path=str(root / "storage")),
    ).validate()
    return loop.WorkerSetup(
        cfg, num_train_pairs=8, pose_estimate=POSE_ESTIMATE, scratch_root=root / "scratch"
    )


def _stored(setup: loop.WorkerSetup, folder: str) -> Path:
    return Path(setup.cfg.storage_path()) / setup.cfg.run_name() / folder


def test_the_loop_trains_saves_and_resumes_without_ray(
    tiny_data: TinyData, pairs: list, tmp_path: Path, capfd
) -> None:
    whole = _setup(tiny_data, tmp_path / "whole")
    host = InProcessHost(pairs)
    loop.run_worker(whole, host)

    save = _stored(whole, SAVE_DIR)
    assert {p.name for p in save.iterdir()} == run_files.run_names(EPOCHS, SAVE_INTERVAL)
    history = json.loads(
        (save / run_files.HISTORY).read_text(),
        parse_constant=lambda c: pytest.fail(f"non-finite {c} in history"),
    )
    psnrs = [v["psnr"] for v in history["val"]]
    assert [v["epoch"] for v in history["val"]] == list(range(1, EPOCHS + 1))
    assert [r["val_psnr"] for r in host.reports] == psnrs
    faces = [v["psnr_face"] for v in history["val"]]  # the default --best_metric's figure
    assert [r["val_psnr_face"] for r in host.reports] == faces and faces != psnrs
    improved = [p > max(faces[:i], default=float("-inf")) for i, p in enumerate(faces)]
    assert [run_files.BEST_MODEL in names for names in host.copies] == improved
    best = ckpt.load_checkpoint(save / run_files.BEST_MODEL)
    assert best["epoch"] == 1 + faces.index(max(faces))  # the first epoch of the top face PSNR
    assert best["best_val_psnr"] == max(psnrs[: best["epoch"]])
    final = ckpt.load_checkpoint(save / run_files.FINAL_MODEL)
    assert final["epoch"] == EPOCHS
    assert final[ckpt.POSE_ESTIMATE_KEY] == POSE_ESTIMATE  # for generate's photo poses
    assert ckpt.load_checkpoint(save / run_files.epoch_checkpoint(2))["epoch"] == 2
    events = EventAccumulator(str(_stored(whole, LOG_DIR)))
    events.Reload()
    assert [e.step for e in events.Scalars("Epoch/ValPSNR")] == list(range(1, EPOCHS + 1))
    assert "Images/Comparison" in events.Tags()["images"]

    # The same run killed after epoch 2 and started again continues from epoch 3, exactly.
    parts = _setup(tiny_data, tmp_path / "parts")
    host = InProcessHost(pairs, die_after=2)
    with pytest.raises(WorkerDied):
        loop.run_worker(parts, host)
    capfd.readouterr()
    loop.run_worker(parts, host)
    assert "continuing at epoch 3" in capfd.readouterr().out
    assert [r["epoch"] for r in host.reports] == [1, 2, 3, 4]
    resumed = ckpt.load_checkpoint(_stored(parts, SAVE_DIR) / run_files.FINAL_MODEL)
    assert resumed["val_metrics_history"] == final["val_metrics_history"]
    for key in ("model_state_dict", ckpt.DISC_KEY):
        for name, value in final[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    assert resumed["engine_state"]["adversary"] == final["engine_state"]["adversary"]

    # Started once more after its last epoch, it trains nothing and reports that epoch again.
    loop.run_worker(parts, host)
    assert "nothing to train: the run already reached epoch 4" in capfd.readouterr().out
    assert host.reports[-1]["epoch"] == EPOCHS and len(host.reports) == EPOCHS + 1

    # The same run with one epoch more (a re-run of the same command, longer) continues to it,
    # discriminator and its optimizer restored.
    longer = _setup(tiny_data, tmp_path / "parts", epochs=EPOCHS + 1)
    loop.run_worker(longer, host)
    out = capfd.readouterr().out
    assert "continuing at epoch 5" in out and "discriminator and its optimizer resumed" in out
    assert host.reports[-1]["epoch"] == EPOCHS + 1
    state = ckpt.load_checkpoint(_stored(longer, SAVE_DIR) / run_files.FINAL_MODEL)
    assert [v["epoch"] for v in state["val_metrics_history"]] == list(range(1, EPOCHS + 2))
    steps = final["engine_state"]["adversary"]["steps"]
    assert steps > 0 and state["engine_state"]["adversary"]["steps"] * EPOCHS == steps * (
        EPOCHS + 1
    )


def test_the_loop_imports_without_ray() -> None:
    """The loop and what it imports load in an interpreter where ``import ray`` fails."""
    code = "import sys; sys.modules['ray'] = None; import controlnet_ray.loop"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_compiled_model_trains_and_saves_plain_weights(
    tiny_data: TinyData, pairs: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--compile``: the training steps run the compiled model (Dynamo traced it, forward
    and backward), and the files hold the bare module's weights, loadable without compiling.
    Dynamo's graphs run through AOTAutograd without Inductor's code generation here (Inductor's
    C++ build of this model takes two minutes on 2 cores); Inductor was measured on an H200."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    from controlnet_ray.model import build_model

    base = _setup(tiny_data, tmp_path, epochs=1)
    cfg = dataclasses.replace(
        base.cfg, optim=dataclasses.replace(base.cfg.optim, compile=True)
    ).validate()
    torch._dynamo.reset()
    counters.clear()
    host = InProcessHost(pairs)
    loop.run_worker(loop.WorkerSetup(cfg, num_train_pairs=8, scratch_root=tmp_path / "s"), host)
    assert counters["stats"]["unique_graphs"] > 0  # it was compiled, not silently eager
    assert [r["epoch"] for r in host.reports] == [1]
    state = ckpt.load_checkpoint(_stored(base, SAVE_DIR) / run_files.FINAL_MODEL)
    weights = state["model_state_dict"]
    assert not [k for k in weights if "_orig_mod" in k]
    build_model(cfg.model).load_state_dict(weights)  # strict
    torch._dynamo.reset()
