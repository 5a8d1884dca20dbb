"""End to end: the CLI in a subprocess on a tiny embedded dataset, through Ray Train.

Asserts on the files the original leaves behind and on TensorBoard tags read back with
TensorBoard's own event reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow

TINY = [
    "--synthetic_identities",
    "8",
    "--synthetic_frames",
    "8",
    "--batch_size",
    "8",
    "--epochs",
    "2",
    "--save_interval",
    "1",
    "--image_size",
    "64",
    "--num_workers",
    "2",
]


def run_train(args: list[str], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        CONTROLNET_RAY_CACHE=str(tmp / "cache"),
        PYTHONUNBUFFERED="1",
        RAY_DATA_PARQUET_FOOTER_NUM_ACTORS="1",
    )
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "controlnet_ray.train", *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_cli_trains_on_embedded_dataset(tmp_path: Path):
    proc = run_train([*TINY, "--save_dir", "ck", "--log_dir", "logs"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    save = tmp_path / "ck"
    for name in (
        "best_model.pth",
        "final_model.pth",
        "checkpoint_epoch_1.pth",
        "checkpoint_epoch_2.pth",
        "training_history.json",
        "final_training_curves.png",
        "training_curves_epoch_2.png",
    ):
        assert (save / name).is_file(), name
    history = json.loads(
        (save / "training_history.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"non-finite {c} in history"),
    )
    assert [h["epoch"] for h in history["val"]] == [1, 2]
    tags = scalars(tmp_path / "logs")
    for tag in ("Epoch/TrainLoss", "Epoch/ValPSNR", "Epoch/ValLoss", "Epoch/TrainImageLoss"):
        assert len(tags[tag]) == 2, tag
    assert all(0 < v < 100 for v in tags["Epoch/ValPSNR"])
    assert "epoch 2/2" in out and "samples/s" in out and "PSNR" in out
    assert "outputs:" in out and str(save.resolve()) in out
    # Re-running the same command finds the finished Ray run and does not train again.
    again = run_train([*TINY, "--save_dir", "ck", "--log_dir", "logs"], tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming" in again.stdout and "epoch 1/2" not in again.stdout


def test_use_gpu_without_gpus_fails_fast(tmp_path: Path):
    proc = run_train([*TINY, "--use_gpu", "--save_dir", "ck"], tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "--use_gpu" in proc.stderr and "GPU" in proc.stderr
