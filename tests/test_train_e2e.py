"""End to end: the CLI in a subprocess on a tiny embedded dataset, through Ray Train.

Asserts on the files the original leaves behind and on TensorBoard tags read back with
TensorBoard's own event reader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from controlnet_ray import run_files
from tests.train_helpers import TINY, TINY_FILES, run_train, run_train_in_pty

pytestmark = pytest.mark.slow


def scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_cli_trains_on_embedded_dataset(tmp_path: Path):
    """The command a user types, in a terminal: the progress bar is drawn, epoch lines come
    plain from the driver, and the original's files and TensorBoard tags are left behind.
    96 px and batch 2 give 24 steps an epoch, so the bar has steps to draw."""
    args = [*TINY, "--image_size", "96", "--batch_size", "2"]
    args += ["--save_dir", "ck", "--log_dir", "logs"]
    status, out = run_train_in_pty(args, tmp_path)
    assert status == 0, out[-4000:]
    frames = re.findall(r"\repoch (\d)/2 train \[[#-]+\] (\d+)/(\d+)", out)
    assert frames, out[-4000:]
    assert {int(total) for _, _, total in frames} == {24}  # 48 train pairs / batch 2
    assert any(int(step) == 24 for _, step, _ in frames)
    # Epoch lines and rank 0's messages come from the driver, without Ray's actor prefixes.
    lines = out.replace("\r\x1b[K", "\n").splitlines()
    assert any(line.startswith("epoch 2/2  train loss") for line in lines), out[-4000:]
    assert any(line.startswith("rank 0 of 1: pid") for line in lines), out[-4000:]
    assert "samples/s" in out and "PSNR" in out

    save = tmp_path / "ck"
    for name in TINY_FILES:
        assert (save / name).is_file(), name
    history = json.loads(
        (save / run_files.HISTORY).read_text(),
        parse_constant=lambda c: pytest.fail(f"non-finite {c} in history"),
    )
    assert [h["epoch"] for h in history["val"]] == [1, 2]
    tags = scalars(tmp_path / "logs")
    for tag in ("Epoch/TrainLoss", "Epoch/ValPSNR", "Epoch/ValLoss", "Epoch/TrainImageLoss"):
        assert len(tags[tag]) == 2, tag
    assert all(0 < v < 100 for v in tags["Epoch/ValPSNR"])
    assert "outputs:" in out and str(save.resolve()) in out
    # Re-running the same command finds the finished Ray run and does not train again.
    again = run_train(args, tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming" in again.stdout and "epoch 1/2" not in again.stdout


def test_use_gpu_without_gpus_fails_fast(tmp_path: Path):
    proc = run_train([*TINY, "--use_gpu", "--save_dir", "ck"], tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "--use_gpu" in proc.stderr and "GPU" in proc.stderr
