"""A real Ray head on this machine, driven only through the commands a user types.

`ray start --head` (token auth on, in a subprocess with its own temp dir), then
`jobs/submit.sh` (= `ray job submit` with jobs/runtime_env.yaml), `ray job status/logs/stop`:
a tiny training job, and a 2-trial ASHA sweep that is interrupted, resumed
and ranked. The jobs run in the head's Python (this venv): the runtime env installs nothing.

The head is stopped through its own `ray start --block` process (SIGTERM, then SIGKILL of its
process group), never with `ray stop`, which would kill every Ray cluster on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlnet_ray import launcher, run_files
from controlnet_ray.config import TrainConfig

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
TINY = [
    "--synthetic_identities", "8", "--synthetic_frames", "8", "--batch_size", "8",
    "--image_size", "64", "--num_workers", "2", "--save_interval", "1",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    """A running head and a client environment that can talk to it."""

    api: str
    env: dict[str, str]
    shared: Path

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: int = 120):
        return subprocess.run(
            [str(BIN / "ray"), *args],
            env=env or self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, kind: str, sid: str, flags: list[str]) -> None:
        env = dict(self.env, SUBMISSION_ID=sid, NO_WAIT="1", SHARED=str(self.shared))
        proc = subprocess.run(
            ["bash", "jobs/submit.sh", kind, *flags],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def status(self, sid: str) -> str:
        """`ray job status` logs (to stderr) "Job 'x' succeeded|failed|was stopped" for a
        finished job and "Status for job 'x': RUNNING" otherwise."""
        proc = self.ray("job", "status", sid)
        out = proc.stdout + proc.stderr
        if found := re.search(r"Job '[^']+' (?:was )?(succeeded|failed|stopped)", out):
            return found.group(1).upper()
        found = re.search(r"Status for job '[^']+': (\w+)", out)
        return found.group(1) if found else "UNKNOWN"

    def wait(self, sid: str, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if (status := self.status(sid)) in TERMINAL:
                return status
            time.sleep(2)
        self.ray("job", "stop", sid)
        pytest.fail(f"job {sid} not finished after {timeout}s:\n{self.logs(sid)[-4000:]}")

    def logs(self, sid: str) -> str:
        return self.ray("job", "logs", sid).stdout

    def run(self, kind: str, sid: str, flags: list[str], timeout: float = 300) -> str:
        self.submit(kind, sid, flags)
        status, logs = self.wait(sid, timeout), self.logs(sid)
        assert status == "SUCCEEDED", logs[-6000:]
        return logs


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # Short path: Ray's unix sockets live under the temp dir and have a length limit.
    tmp = Path(tempfile.mkdtemp(prefix="crh", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    port, dash = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API"))}
    base.pop("RAY_AUTH_TOKEN", None)
    common = dict(
        base,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    # RAY_ADDRESS on the head's processes: Train's PlacementGroupCleaner finds the cluster
    # through the State API, which fails when other Ray instances run on this machine.
    head_env = dict(common, RAY_ADDRESS=f"127.0.0.1:{port}")
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=3",
        f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]  # fmt: skip
    with (tmp / "head.log").open("w") as log:
        proc = subprocess.Popen(
            cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    api = f"http://127.0.0.1:{dash}"
    h = Head(api=api, env=dict(common, RAY_API_SERVER_ADDRESS=api), shared=tmp / "shared")
    try:
        wait_until_up(h, proc, tmp / "head.log")
        yield h
    finally:
        stop_head(proc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def wait_until_up(h: Head, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if h.ray("job", "list", timeout=60).returncode == 0:
            return
        time.sleep(2)
    pytest.fail(f"Ray head not up after {timeout}s:\n{log.read_text()[-4000:]}")


def stop_head(proc: subprocess.Popen, tmp: Path) -> None:
    """Stop the head by the ids this test owns: its process group, then stragglers by temp dir.

    SIGTERM makes `ray start --block` drain for up to 30 s; a test has no state to drain, so
    after a short grace the whole group (GCS, raylet, workers, job drivers) gets SIGKILL.
    """
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in pids_mentioning(str(tmp)):  # anything that left the group but runs our session
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
    return pids


# --- tests -----------------------------------------------------------------------------------


def test_client_needs_auth_mode_token_and_env_address_wins(head: Head):
    assert head.ray("job", "list").returncode == 0
    no_mode = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
    refused = head.ray("job", "list", env=no_mode)
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr
    # RAY_ADDRESS beats --address; RAY_API_SERVER_ADDRESS beats both.
    no_api = {k: v for k, v in head.env.items() if k != "RAY_API_SERVER_ADDRESS"}
    wrong_env = dict(no_api, RAY_ADDRESS="http://127.0.0.1:9")
    assert head.ray("job", "list", "--address", head.api, env=wrong_env).returncode != 0
    both = dict(wrong_env, RAY_API_SERVER_ADDRESS=head.api)
    assert head.ray("job", "list", "--address", "http://127.0.0.1:9", env=both).returncode == 0


def test_training_job_writes_outputs_in_the_shared_storage_under_a_stable_run_name(head: Head):
    """A job's outputs and its Ray run land in the shared storage, the run named from
    ``--save_dir`` and the settings as a local run's is: a second submission of the same
    command computes the same name and so continues the run (the continuation itself is
    tested locally, in test_resume_faults.py's re-runs, and for a job by the sweep test
    below)."""
    logs = head.run("train", "train-1", [*TINY, "--epochs", "1"])
    assert "epoch 1/1" in logs
    save = head.shared / "runs" / "train"
    for name in (run_files.BEST_MODEL, run_files.FINAL_MODEL, run_files.epoch_checkpoint(1)):
        assert (save / name).is_file(), name
    (run,) = (head.shared / "ray_results").glob("controlnet_train_*")
    assert list(run.glob("checkpoint_*/state.pth")), run
    # The resubmitted command (the config the driver recorded in --save_dir, name unset) gets
    # the same name: from its --save_dir and the settings that define the training.
    again = TrainConfig.from_dict(launcher.read_run_record(save)["config"])
    again.ray.run_name = None
    assert run.name == again.run_name()
    history = json.loads((save / run_files.HISTORY).read_text())
    assert [h["epoch"] for h in history["val"]] == [1]


def test_sweep_job_is_stopped_resumed_and_ranked(head: Head):
    """Stop a sweep job mid-way, resume it, and check ASHA's decision and the ranking against
    the trials' own rung-1 results (read back from their histories), so the outcome is certain
    by construction: which trial trains better in one epoch on tiny data is not (lr 1e-3 did
    not always beat an untrained model, and the warp generator's untrained output is good).
    Trials run one at a time in grid order, so ASHA has the first trial's rung-1 result when
    the second reaches the rung: the second is stopped exactly when it is worse."""
    flags = [
        *TINY, "--epochs", "2", "--sweep_name", "sw", "--loss_types", "mse",
        "--pose_loss_weights", "0.1", "--lrs", "1e-9", "3e-3",
        "--scheduler", "asha", "--grace_period", "1", "--reduction_factor", "2",
        "--max_concurrent_trials", "1", "--warmup_epochs", "0",
    ]  # fmt: skip
    sweep_out = head.shared / "runs" / "tune" / "sw"
    head.submit("tune", "sweep-1", flags)
    # Interrupt once ASHA has recorded the first trial's epoch 1.
    deadline = time.time() + 300
    while time.time() < deadline and head.status("sweep-1") not in TERMINAL:
        rungs = sweep_out / "asha_rungs.json"
        if rungs.is_file() and any(rec for b in json.loads(rungs.read_text()) for _, rec in b):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no ASHA record before the sweep ended:\n{head.logs('sweep-1')[-4000:]}")
    assert head.ray("job", "stop", "sweep-1").returncode == 0
    assert head.wait("sweep-1", 120) == "STOPPED"
    assert not (sweep_out / "sweep_results.json").exists()

    logs = head.run("tune", "sweep-2", flags, timeout=400)
    assert "resuming sweep sw" in logs and "ASHA: restored" in logs, logs[-6000:]
    assert "ranked by best val_psnr_face" in logs
    assert "Found multiple active Ray instances" not in logs
    doc = json.loads((sweep_out / "sweep_results.json").read_text())
    trials = {t["lr"]: t for t in doc["trials"]}
    assert set(trials) == {1e-9, 3e-3}, doc
    first, second = trials[1e-9], trials[3e-3]  # grid order, one trial at a time

    def rung1(trial: dict) -> float:
        history = json.loads((Path(trial["save_dir"]) / run_files.HISTORY).read_text())
        return history["val"][0]["psnr_face"]  # --best_metric

    assert (first["status"], first["epochs_run"], first["stopped_early"]) == ("finished", 2, False)
    if rung1(second) < rung1(first):
        expected = ("stopped early", 1, True)
    else:
        expected = ("finished", 2, False)
    assert (second["status"], second["epochs_run"], second["stopped_early"]) == expected, (
        rung1(first),
        rung1(second),
    )
    best = max(trials.values(), key=lambda t: t["best_score"])
    assert doc["best"]["trial_id"] == best["trial_id"] and doc["best_config"]["lr"] == best["lr"]
    assert Path(best["checkpoint"], run_files.RAY_STATE_FILE).is_file()
    assert (Path(best["save_dir"]) / run_files.BEST_MODEL).is_file()
    assert (sweep_out / "sweep_results.csv").read_text().count("\n") == 3
