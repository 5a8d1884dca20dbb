"""TensorBoard tags read back with TensorBoard's own reader; history JSON; curve PNGs."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from tensorboard.backend.event_processing import event_accumulator as ea

from controlnet_ray import reporting
from controlnet_ray.reporting import TensorBoardReporter

NAN, INF = float("nan"), float("inf")
TRAIN = {"loss": 1.5, "image_loss": 1.0, "pose_loss": 5.0}
VAL = {
    "loss": 1.25, "image_loss": 0.75, "psnr": 18.5, "ssim": 0.6, "pose_mae": 4.0,
    "pose_mae_yaw": 5.0, "pose_mae_pitch": 3.0, "pose_mae_roll": 4.0,
}  # fmt: skip


def _read(log_dir: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(
        str(log_dir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0}
    )
    acc.Reload()
    return acc


def _scalars(acc: ea.EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_scalar_tags_match_the_original_and_skip_non_finite(tmp_path: Path) -> None:
    with TensorBoardReporter(tmp_path) as tb:
        tb.log_step(0, {"loss": 2.0, "image_loss": 1.5, "pose_loss": 5.0, "lr": 1e-4})
        tb.log_step(1, {"loss": NAN, "image_loss": INF, "pose_loss": 4.0, "lr": 1e-4})
        tb.log_epoch(1, TRAIN, VAL, samples_per_sec=123.5)
        tb.log_epoch(2, {"train_loss": -INF}, {"val_psnr": NAN, "val_loss": 1.0}, None)
        assert tb.skipped == {"Train/Loss": 1, "Train/ImageLoss": 1, "Epoch/TrainLoss": 1,
                              "Epoch/ValPSNR": 1}  # fmt: skip
        # The worker's spelling: tag-suffix step keys, pose_mae_deg, throughput inside train.
        tb.log_step(2, {"Loss": 3.0, "ImageLoss": 2.0, "PoseLoss": 1.0, "LearningRate": 5e-5})
        tb.log_epoch(3, {"loss": 0.5, "samples_per_sec": 99.0}, {"pose_mae_deg": 2.5})
    scalars = _scalars(_read(tmp_path))

    assert set(scalars) == {
        "Train/Loss", "Train/ImageLoss", "Train/PoseLoss", "Train/LearningRate",
        "Epoch/TrainLoss", "Epoch/TrainImageLoss", "Epoch/TrainPoseLoss", "Epoch/ValLoss",
        "Epoch/ValImageLoss", "Epoch/ValPSNR", "Epoch/ValSSIM", "Epoch/ValPoseMAE",
        "Epoch/ValPoseMAE_yaw", "Epoch/ValPoseMAE_pitch", "Epoch/ValPoseMAE_roll",
        "Epoch/SamplesPerSec",
    }  # fmt: skip
    assert scalars["Train/Loss"] == [(0, 2.0), (2, 3.0)]
    assert scalars["Train/LearningRate"][-1] == (2, pytest.approx(5e-5))
    assert scalars["Epoch/ValPoseMAE"] == [(1, 4.0), (3, 2.5)]
    assert scalars["Epoch/SamplesPerSec"] == [(1, 123.5), (3, 99.0)]
    assert scalars["Train/PoseLoss"] == [(0, 5.0), (1, 4.0), (2, 1.0)]
    assert scalars["Train/LearningRate"][0] == (0, pytest.approx(1e-4))
    assert scalars["Epoch/ValPSNR"] == [(1, 18.5)]
    assert scalars["Epoch/ValLoss"] == [(1, 1.25), (2, 1.0)]
    assert scalars["Epoch/ValPoseMAE_pitch"] == [(1, 3.0)]
    assert all(math.isfinite(v) for series in scalars.values() for _, v in series)


def _rgb(value: float, b: int = 6, size: int = 16) -> torch.Tensor:
    return torch.full((b, 3, size, size), value)


def _png(event) -> torch.Tensor:
    return torch.from_numpy(imread(io.BytesIO(event.encoded_image_string), format="png"))


def test_image_grid_rows_are_source_target_output(tmp_path: Path) -> None:
    source, target, output = _rgb(-1.0), _rgb(1.0), _rgb(0.0)
    output[1, 0, 0, 0] = NAN
    with TensorBoardReporter(tmp_path) as tb:
        tb.log_images(10, source, target, _rgb(0.0), max_samples=4)
        tb.log_images(20, source, target, output, max_samples=4)
        assert tb.skipped == {"Images/Comparison": 1, "Images/Sample_1": 1}
    acc = _read(tmp_path)
    assert set(acc.Tags()["images"]) == {"Images/Comparison"} | {
        f"Images/Sample_{i}" for i in range(4)
    }
    (comparison,) = acc.Images("Images/Comparison")
    assert (comparison.step, comparison.height, comparison.width) == (10, 3 * 16 + 4, 4 * 16 + 6)
    grid = _png(comparison)
    assert grid[:16, :16, :3].max() == 0.0  # source row: -1 -> black
    assert grid[18:34, :16, :3].min() == 1.0  # target row: +1 -> white
    assert grid[36:52, :16, :3].mean() == pytest.approx(0.5, abs=0.01)  # output row: grey

    assert [e.step for e in acc.Images("Images/Sample_1")] == [10]
    assert [e.step for e in acc.Images("Images/Sample_0")] == [10, 20]
    sample = acc.Images("Images/Sample_0")[0]
    assert (sample.height, sample.width) == (16, 3 * 16 + 4)
    row = _png(sample)
    assert row[:, :16, :3].max() == 0.0 and row[:, 18:34, :3].min() == 1.0


def test_pose_histograms_in_degrees(tmp_path: Path) -> None:
    source = torch.tensor([[0.0, 10.0, -5.0], [30.0, 0.0, 0.0]])
    target = torch.tensor([[45.0, 10.0, 0.0], [-30.0, NAN, 0.0]])
    with TensorBoardReporter(tmp_path) as tb:
        tb.log_pose_histograms(3, source, target)
    acc = _read(tmp_path)
    assert set(acc.Tags()["histograms"]) == {"Pose/Target", "Pose/Source", "Pose/Difference"}
    src = acc.Histograms("Pose/Source")[0].histogram_value
    assert (src.min, src.max, src.num, src.sum) == (-5.0, 30.0, 6, 35.0)
    diff = acc.Histograms("Pose/Difference")[0]
    assert diff.step == 3 and diff.histogram_value.num == 5  # the NaN is left out
    assert (diff.histogram_value.min, diff.histogram_value.max) == (-60.0, 45.0)
    assert acc.Histograms("Pose/Target")[0].histogram_value.sum == 25.0


def test_disabled_reporter_writes_nothing(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    with TensorBoardReporter(log_dir, enabled=False) as tb:
        tb.log_step(0, {"loss": 1.0})
        tb.log_epoch(0, TRAIN, VAL, 1.0)
        tb.log_images(0, _rgb(0.0), _rgb(0.0), _rgb(0.0))
        tb.log_pose_histograms(0, torch.zeros(2, 3), torch.ones(2, 3))
        tb.flush()
    assert not log_dir.exists()


def _raise_on_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def test_history_json_is_strict_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    train = [{"loss": 1.0, "pose_loss": NAN}, {"loss": torch.tensor(0.5), "pose_loss": INF}]
    val = [{"psnr": 20.0}, {"psnr": -INF}]
    reporting.write_history_json(path, train, val, extra={"best_epoch": 1, "note": "x"})
    text = path.read_text()
    doc = json.loads(text, parse_constant=_raise_on_constant)
    assert doc["train"] == [
        {"loss": 1.0, "pose_loss": None},
        {"loss": 0.5, "pose_loss": None},
    ]
    assert doc["val"][1] == {"psnr": None}
    assert reporting.load_history_json(path) == doc
    assert doc["extra"] == {"best_epoch": 1, "note": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]

    (tmp_path / "bad.json").write_text('{"train": [NaN')
    with pytest.raises(ValueError, match=r"bad.json"):
        reporting.load_history_json(tmp_path / "bad.json")


def test_curves_png_is_a_real_image(tmp_path: Path) -> None:
    train = [{"loss": 2.0 - 0.1 * i, "image_loss": 1.0, "pose_loss": 3.0} for i in range(5)]
    val = [dict(VAL, psnr=15.0 + i) for i in range(5)]
    val[2]["ssim"] = NAN
    path = reporting.save_curves_png(train, val, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 1000 and image.std() > 0.05
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

    empty = reporting.save_curves_png([], [], tmp_path / "empty.png")
    assert imread(empty).size > 0


def test_one_image_grid_for_tensorboard_and_pngs() -> None:
    """``image_grid`` lays out both TensorBoard's grids (no border) and the PNG grids of
    evaluate/generate (``inference.grid``: uint8, white border, short rows end in white)."""
    import numpy as np

    from controlnet_ray.inference import grid
    from controlnet_ray.reporting import image_grid

    tile = np.zeros((4, 3, 3), np.uint8)
    png = grid([[tile, tile], [tile]], pad=2)
    assert png.shape == (2 * (4 + 2) + 2, 2 * (3 + 2) + 2, 3)
    assert png[2:6, 2:5].max() == 0 and png[8:12, 7:10].min() == 255  # the short row's gap
    assert grid([[tile]]).shape == (8, 7, 3)  # one tile still gets its border
    tb = image_grid([[torch.zeros(3, 4, 3)] * 2], border=False)
    assert tb.shape == (3, 4, 3 + 2 + 3) and tb[:, :, 3:5].min() == 1.0
