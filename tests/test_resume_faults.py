"""Surviving failures, by killing real processes: a training worker SIGKILLed mid-run,
restarted by Ray, with 2 DDP workers so that the multi-worker path is covered too; then the
driver killed and the same command re-run. (--resume FILE through the original's two-stage
recipe, and its refusals: tests/test_original_guide.py; a re-run with more epochs: the loop
in-process, tests/test_loop.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from controlnet_ray import run_files
from tests.train_helpers import TINY, run_train, train_env

pytestmark = pytest.mark.slow


def history_epochs(save_dir: Path) -> list[int]:
    doc = json.loads((save_dir / run_files.HISTORY).read_text())
    return [h["epoch"] for h in doc["val"]]


def start_train(args: list[str], tmp: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "controlnet_ray.train", *args],
        cwd=tmp,
        env=train_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 400) -> tuple[str, re.Match]:
    """Read the child's output until a line matches; fail with the output so far."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if m := re.search(pattern, line):
            return "".join(seen), m
    proc.kill()
    pytest.fail(f"no line matching {pattern!r}; output:\n{''.join(seen)[-4000:]}")


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid`` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[3]) == sid:
                pids.append(int(stat.parent.name))
    return pids


def kill_driver_and_its_ray(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL the driver and everything its local Ray runs, and return once all are gone.

    Ray's actors (the Train controller among them) run in process groups of their own, so
    ``killpg`` on the driver's group leaves them alive for a moment, still writing the run's
    checkpoints and Ray's record of them; a re-run started then races with them. They all
    share the driver's session (``start_new_session``), which is what is killed here."""
    deadline = time.monotonic() + timeout
    while pids := session_pids(proc.pid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            pytest.fail(f"processes of the killed run still alive: {pids}")
        time.sleep(0.1)  # polling the condition above, not waiting for time to pass
    proc.wait(timeout=timeout)


def test_worker_sigkill_is_recovered_then_driver_killed_and_same_command_resumes(tmp_path: Path):
    """Two DDP workers: a worker SIGKILLed in epoch 1 is restarted by Ray from the epoch-1
    checkpoint; then the driver (and with it the local Ray) is killed in epoch 2, and the same
    command, typed again, resumes from the latest checkpoint without retraining an epoch."""
    args = [*TINY, "--epochs", "3", "--num_ray_workers", "2", "--max_failures", "2"]
    args += ["--save_dir", "ck", "--log_dir", "logs"]
    proc = start_train(args, tmp_path)
    before, m = read_until(proc, r"rank 0 of 2: pid (\d+)")
    assert "x 0.5 CPU" in before and "= 16" in before  # planned CPUs; effective batch 8 x 2
    read_until(proc, r"epoch 1/3 ")
    os.kill(int(m.group(1)), signal.SIGKILL)
    read_until(proc, r"resumed from Ray checkpoint .* at epoch 1")
    # Epoch lines are printed after the epoch's checkpoint is registered with Ray.
    read_until(proc, r"epoch 2/3 ")
    kill_driver_and_its_ray(proc)

    again = run_train(args, tmp_path)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "resuming from its latest checkpoint" in out
    m = re.search(r"resumed from Ray checkpoint .* at epoch (\d+)", out)
    assert m and int(m.group(1)) >= 2, out[-4000:]
    assert "epoch 1/3 " not in out and "epoch 2/3 " not in out  # not trained again
    assert history_epochs(tmp_path / "ck") == [1, 2, 3]
    state = torch.load(tmp_path / "ck" / run_files.FINAL_MODEL, weights_only=True)
    assert state["epoch"] == 3
