"""Running the training CLI in subprocesses, as a user would."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
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


def run_train_in_pty(
    args: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdout/stderr (as in a user's shell, so the
    progress bar is drawn); return (status, raw output). ``env``: extra variables."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlnet_ray.train", *args],
        cwd=cwd,
        env=dict(train_env(cwd), COLUMNS="160", **(env or {})),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    if proc.poll() is None:
        proc.kill()
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


def scalars(log_dir: Path) -> dict[str, list[float]]:
    """TensorBoard scalars under ``log_dir``, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
