"""The run's files by name and the best-model metric (``controlnet_ray.run_files``).

``test_the_original_names_and_cadence`` is the one contract test that spells the user-visible
names out; every other test takes them from ``run_files``.
"""

from __future__ import annotations

import math

import pytest

from controlnet_ray import run_files
from controlnet_ray.checkpoint import RunState


def test_the_original_names_and_cadence() -> None:
    names = run_files.epoch_names
    assert names(3, 10, 5, is_best=False) == run_files.EpochNames((), ())
    assert names(5, 10, 5, is_best=True).copies == ("checkpoint_epoch_5.pth", "best_model.pth")
    assert names(5, 10, 5, is_best=True).curves == ("training_curves_epoch_5.png",)
    last = names(10, 10, 5, is_best=False)
    assert last.copies == ("checkpoint_epoch_10.pth", "final_model.pth")
    assert last.curves == ("training_curves_epoch_10.png", "final_training_curves.png")
    assert run_files.run_names(epochs=2, save_interval=1) == {
        "best_model.pth",
        "final_model.pth",
        "checkpoint_epoch_1.pth",
        "checkpoint_epoch_2.pth",
        "training_history.json",
        "training_curves_epoch_1.png",
        "training_curves_epoch_2.png",
        "final_training_curves.png",
    }
    assert run_files.RAY_STATE_FILE == "state.pth"


def test_run_names_of_a_continued_run_start_at_its_first_epoch() -> None:
    assert run_files.run_names(epochs=4, save_interval=2, first_epoch=3) == {
        run_files.HISTORY,
        run_files.BEST_MODEL,
        run_files.FINAL_MODEL,
        run_files.FINAL_CURVES,
        run_files.epoch_checkpoint(4),
        run_files.epoch_curves(4),
    }


@pytest.mark.parametrize(
    ("metric", "psnrs", "losses", "best_epochs"),
    [
        # PSNR must beat the best; a tie is not a new best.
        ("val_psnr", [20.0, 22.0, 22.0, 21.0], [1.0, 0.5, 0.4, 0.3], [1, 2]),
        # A loss equal to the best counts.
        ("val_loss", [20.0, 22.0, 22.0, 21.0], [1.0, 0.5, 0.5, 0.6], [1, 2, 3]),
    ],
)
def test_record_epoch_says_which_epochs_are_the_best(
    metric: str, psnrs: list[float], losses: list[float], best_epochs: list[int]
) -> None:
    run = RunState()
    chosen = [
        epoch
        for epoch, (psnr, loss) in enumerate(zip(psnrs, losses, strict=True), start=1)
        if run.record_epoch(epoch, {"loss": 2.0}, {"loss": loss, "psnr": psnr}, metric)
    ]
    assert chosen == best_epochs
    assert (run.best_val_psnr, run.best_val_loss) == (max(psnrs), min(losses))
    assert [v["epoch"] for v in run.val_history] == [1, 2, 3, 4]
    assert run.val_history[0] == {"epoch": 1, "loss": losses[0], "psnr": psnrs[0]}


def test_the_best_face_psnr_is_read_off_the_history_and_survives_a_resume() -> None:
    """``val_psnr_face`` (the default --best_metric): the best is the history's largest face
    PSNR, so a resumed run competes with the epochs its checkpoint holds; a history written
    before the figure existed has none, and the first new epoch is the best."""
    run = RunState()
    faces = [17.0, 18.5, 18.2, 18.5, 18.9]
    chosen = [
        epoch
        for epoch, face in enumerate(faces, start=1)
        if run.record_epoch(
            epoch, {}, {"loss": 1.0, "psnr": 14.0, "psnr_face": face}, "val_psnr_face"
        )  # fmt: skip
    ]
    assert chosen == [1, 2, 5]
    state = {"best_val_psnr": 14.0, "best_val_loss": 1.0, "val_metrics_history": run.val_history}
    resumed = RunState.continued_from(state, start_epoch=6)
    assert not resumed.record_epoch(6, {}, {"loss": 1.0, "psnr": 14.0, "psnr_face": 18.8},
                                    "val_psnr_face")  # fmt: skip
    old = {"best_val_psnr": 14.0, "best_val_loss": 1.0,
           "val_metrics_history": [{"epoch": 1, "loss": 1.0, "psnr": 14.0}]}  # fmt: skip
    legacy = RunState.continued_from(old, start_epoch=2)
    assert legacy.record_epoch(2, {}, {"loss": 1.0, "psnr": 13.0, "psnr_face": 10.0},
                               "val_psnr_face")  # fmt: skip


def test_a_continued_run_competes_with_its_stored_bests() -> None:
    run = RunState.continued_from({"best_val_psnr": 25.0, "best_val_loss": 0.1}, start_epoch=4)
    assert not run.record_epoch(4, {}, {"loss": 0.2, "psnr": 24.0}, "val_psnr")
    assert run.record_epoch(5, {}, {"loss": 0.2, "psnr": 26.0}, "val_psnr")
    assert math.isclose(run.best_val_psnr, 26.0)


def test_score_order_serves_every_best_metric_flag() -> None:
    from controlnet_ray.config import BEST_METRICS

    assert {m: run_files.score_order(m) for m in BEST_METRICS} == {
        "val_psnr_face": "max",
        "val_psnr": "max",
        "val_loss": "min",
    }
    with pytest.raises(ValueError, match="no best-model order for 'val_ssim'"):
        run_files.score_order("val_ssim")


def test_run_file_names() -> None:
    ours = ["best_model.pth", "checkpoint_epoch_5.pth", "training_curves_epoch_5.png"]
    assert all(run_files.is_save_dir_file(n) for n in ours)
    others = ["checkpoint_epoch_.pth", "checkpoint_epoch_5x.pth", "model.pth", "notes.txt"]
    assert not any(run_files.is_save_dir_file(n) for n in others)
    assert run_files.is_log_dir_file("events.out.tfevents.1.h")
    assert not run_files.is_log_dir_file("best_model.pth")
