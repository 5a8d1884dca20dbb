"""Running the training CLI in subprocesses, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from controlnet_ray import run_files

# A tiny embedded dataset: 8 identities x 8 frames, 64 px crops; two quick epochs.
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
TINY_EPOCHS = 2
TINY_FILES = run_files.run_names(epochs=TINY_EPOCHS, save_interval=1)  # what --save_dir gets


def train_env(tmp: Path) -> dict[str, str]:
    """One cache per pytest session (the synthetic set and shards are reused) and local Ray."""
    cache = os.environ.get("CONTROLNET_RAY_TEST_CACHE", str(Path(tmp).parent / "cache"))
    env = dict(
        os.environ,
        CONTROLNET_RAY_CACHE=cache,
        PYTHONUNBUFFERED="1",
        RAY_DATA_PARQUET_FOOTER_NUM_ACTORS="1",
    )
    env.pop("RAY_ADDRESS", None)
    return env


def run_train(args: list[str], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "controlnet_ray.train", *args],
        cwd=tmp,
        env=train_env(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
