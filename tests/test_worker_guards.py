"""The loop's guards against recording or reporting what was not trained (no Ray started).

A ``TrainingLoop`` is assembled around a real ``TrainEngine`` and stand-in model (the pieces its
epoch loop uses), so these run in-process in milliseconds.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from controlnet_ray import loop
from controlnet_ray.checkpoint import RunState
from controlnet_ray.config import OptimConfig, TrainConfig
from controlnet_ray.engine import NonFiniteLossError
from controlnet_ray.progress import WorkerProgress
from tests.test_engine import make_batch, make_engine


def _pipeline_batch(b: int = 4, nan: bool = False) -> dict[str, torch.Tensor]:
    """A batch as Ray Data delivers it (uint8 [B,H,W,3] images, float poses); ``nan``: one
    non-finite pose, so that step's loss is not finite (uint8 images cannot hold a NaN)."""
    batch = make_batch(b, seed=99 if nan else 0)
    for k in ("source", "target"):
        batch[k] = ((batch[k] + 1) * 127.5).round().to(torch.uint8).movedim(1, -1)
    if nan:
        batch["target_pose"][0, 0] = float("nan")
    return batch


def _run(batches_per_epoch: int, rank: int = 0) -> tuple[loop.TrainingLoop, object]:
    """A TrainingLoop whose engine trains the engine tests' TinyNet (no host is asked)."""
    engine = make_engine(OptimConfig(max_nonfinite_steps=100))
    trainee = loop.Trainee(
        model=engine.model, optimizer=engine.optimizer, scheduler=engine.scheduler,
        engine=engine, adversary=None, signature={}, trainable=[],
        batches_per_epoch=batches_per_epoch, run=RunState(),
    )  # fmt: skip
    host = SimpleNamespace(rank=rank, world=1, device=torch.device("cpu"))
    progress = WorkerProgress(None, 1)  # not rank 0: prints nothing
    run = loop.TrainingLoop(TrainConfig(), host, trainee, None, None, progress)

    class NoReporter:
        def log_step(self, *_: object) -> None:
            raise AssertionError("skipped steps must not be logged")

    return run, NoReporter()


def test_epoch_where_every_step_was_skipped_fails_instead_of_loss_zero() -> None:
    run, reporter = _run(batches_per_epoch=3)
    before = [p.clone() for p in run.model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"epoch 4: no optimizer step succeeded \(3 of 3"):
        run._train_epoch(4, [_pipeline_batch(nan=True) for _ in range(3)], reporter)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))


def test_epoch_with_some_skipped_steps_averages_the_trained_ones() -> None:
    run, _ = _run(batches_per_epoch=3, rank=1)  # no step logging
    batches = [_pipeline_batch(nan=True), _pipeline_batch(), _pipeline_batch(nan=True)]
    metrics = run._train_epoch(1, batches, None)
    assert metrics["samples"] == 4 and math.isfinite(metrics["loss"]) and metrics["loss"] > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_metrics_never_reach_ray(bad: float) -> None:
    assert loop._require_finite({"val_psnr": 20.0}, "epoch 1") == {"val_psnr": 20.0}
    with pytest.raises(NonFiniteLossError, match=f"epoch 2: validation.*val_psnr {bad}"):
        loop._require_finite({"val_loss": 0.1, "val_psnr": bad}, "epoch 2: validation")
