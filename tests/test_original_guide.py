"""Every command of the original script's guide works as ``python -m controlnet_ray.train``.

The guide (../shared/reference/original-model2-training-guide.zh.md) is what users run today,
from the original repo's root, one command after another. Each command is parsed from a folder
laid out like that repo; all of them are then trained in the guide's order from one such folder
on a tiny dataset (a new configuration in a used ``--save_dir`` is a new run that sets the
previous one's files aside), and the full-configuration form (with its quirky
``--image_dir train/datas/file``) is also run in a terminal as a user types it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from controlnet_ray import run_files
from controlnet_ray.cli import parse_train_args
from controlnet_ray.data.synthetic import SyntheticSpec, render_dataset
from tests.train_helpers import run_train_in_pty, scalars, train_env

GUIDE = (
    Path(__file__).resolve().parents[2] / "shared/reference/original-model2-training-guide.zh.md"
)
SCRIPT = "train_transformer3D/controlnetlike/train_image_controlnet.py"


def guide_commands() -> list[list[str]]:
    if not GUIDE.is_file():
        pytest.skip(f"the original guide is not at {GUIDE}")
    text = GUIDE.read_text(encoding="utf-8").replace("\\\n", " ")
    commands = [shlex.split(line) for line in text.splitlines() if f"python {SCRIPT}" in line]
    return [c[c.index(SCRIPT) + 1 :] for c in commands]


@pytest.fixture
def original_repo(tmp_path: Path, monkeypatch) -> Path:
    """An empty folder laid out like the original repo, with the checkpoints the guide resumes."""
    (tmp_path / "train/datas/file").mkdir(parents=True)
    base = tmp_path / "train_transformer3D/controlnetlike"
    for rel in (
        "checkpoints_image_stage1/best_model.pth",
        "checkpoints_image/checkpoint_epoch_50.pth",
    ):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def expected_values(argv: list[str]) -> dict[str, str | bool]:
    """flag -> value as written in the guide (both the --flag and the dash-less forms)."""
    booleans = {"use_amp", "freeze_generator"}
    out: dict[str, str | bool] = {}
    tokens = [t.removeprefix("--") for t in argv]
    i = 0
    while i < len(tokens):
        if tokens[i] in booleans:
            out[tokens[i]] = True
            i += 1
        else:
            out[tokens[i]] = tokens[i + 1]
            i += 2
    return out


def test_guide_has_the_commands_we_expect():
    commands = guide_commands()
    assert len(commands) >= 12
    assert any(not c[0].startswith("--") for c in commands)  # the dash-less form is there


def test_every_guide_command_parses_with_the_same_meaning(original_repo: Path):
    for argv in guide_commands():
        cfg = parse_train_args(argv)
        flat = {**vars(cfg.data), **vars(cfg.model), **vars(cfg.optim), **vars(cfg.output)}
        for flag, value in expected_values(argv).items():
            got = flat[flag]
            if value is True:
                assert got is True, (argv, flag)
            elif isinstance(got, bool | int | float):
                assert got == type(got)(value), (argv, flag, got)
            else:
                assert got == value, (argv, flag, got)


@pytest.mark.slow
def test_full_configuration_command_trains_from_an_original_repo(tmp_path: Path):
    """The guide's full configuration, typed in a terminal from a folder laid out like the
    original repo: the progress bar is drawn, epoch lines come plain from the driver, the
    original's files and TensorBoard tags are left where the original put them, and the local
    Ray the run started is gone with its session folder."""
    render_dataset(tmp_path, SyntheticSpec(num_identities=8, frames_per_identity=8, seed=3))
    full = next(c for c in guide_commands() if "--feature_dim" in c and "--resume" not in c)
    # Same command; only the run length, batch (steps for the bar) and crop size are shortened.
    overrides = ["--epochs", "2", "--batch_size", "2", "--image_size", "64", "--save_interval", "1"]
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        status, out = run_train_in_pty(
            [*full, *overrides], tmp_path, env={"RAY_TMPDIR": str(ray_tmp)}
        )
        assert status == 0, out[-4000:]
        sessions = [p.name for p in (ray_tmp / "ray").glob("session_2*")]
        assert not sessions, sessions  # the launcher removed its Ray session folder
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "image root:" in out

    steps = int(re.search(r"rank 0 of 1: pid \d+, device cpu, (\d+) batches/epoch", out).group(1))
    frames = re.findall(r"\repoch (\d)/2 train \[[#-]+\] (\d+)/(\d+)", out)
    assert steps > 2 and frames, out[-4000:]
    assert {int(total) for _, _, total in frames} == {steps}
    assert any(int(step) == steps for _, step, _ in frames)
    lines = out.replace("\r\x1b[K", "\n").splitlines()  # epoch lines without Ray's prefixes
    assert any(line.startswith("epoch 2/2  train loss") for line in lines), out[-4000:]
    assert "samples/s" in out and "PSNR" in out

    save = tmp_path / "train_transformer3D/controlnetlike/checkpoints_image"
    for name in run_files.run_names(epochs=2, save_interval=1):
        assert (save / name).is_file(), name
    history = json.loads(
        (save / run_files.HISTORY).read_text(),
        parse_constant=lambda c: pytest.fail(f"non-finite {c} in history"),
    )
    assert [h["epoch"] for h in history["val"]] == [1, 2]
    tags = scalars(tmp_path / "train_transformer3D/controlnetlike/logs_image")
    for tag in ("Epoch/TrainLoss", "Epoch/ValPSNR", "Epoch/ValLoss", "Epoch/TrainImageLoss"):
        assert len(tags[tag]) == 2, tag
    assert all(0 < v < 100 for v in tags["Epoch/ValPSNR"])
    assert "outputs:" in out and str(save.resolve()) in out


# --------------------------------------------------------------------------- in the guide's order

BASE = Path("train_transformer3D/controlnetlike")
# Each command's run is shortened (one epoch, two after a --resume, 32 px crops); nothing else
# of the command changes.
SHORTEN = ["--image_size", "32", "--progress", "lines"]
# Scenario 6 resumes from the epoch-50 checkpoint of a 100-epoch full-configuration run; the
# shortened run leaves its final epoch there instead (copied under the name the guide uses).
EPOCH_50 = BASE / "checkpoints_image/checkpoint_epoch_50.pth"


def shortened(argv: list[str]) -> list[str]:
    epochs = "2" if "--resume" in argv else "1"
    return [*argv, "--epochs", epochs, *SHORTEN]


def run_guide_in_order(root: Path, extra_runs: list[list[str]]) -> None:
    """Run every guide command, then ``extra_runs``, in order from ``root`` in this process,
    against one local Ray (one cluster for the whole sequence); print each command's rc.
    Each command's ``main`` is the one ``python -m controlnet_ray.train`` runs."""
    import ray

    from controlnet_ray.train import main

    os.chdir(root)
    ray.init(num_cpus=3, include_dashboard=False)
    for argv in [shortened(c) for c in guide_commands()] + extra_runs:
        if "--resume" in argv and str(EPOCH_50) in argv and not EPOCH_50.is_file():
            shutil.copy(EPOCH_50.with_name(run_files.FINAL_MODEL), EPOCH_50)
        print(f"GUIDE_RC {main(argv)} {shlex.join(argv)}", flush=True)


def _config(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["config"]


def _stage2(*extra: str) -> list[str]:
    """Scenario 1's second stage, shortened as the sequence runs it, with ``extra`` flags."""
    stage2 = next(c for c in guide_commands() if "5e-5" in c)
    return [*shortened(stage2), *extra]


@pytest.mark.slow
def test_the_guide_runs_in_order_from_one_folder(tmp_path: Path):
    """The guide's 15 training commands, one after another from one folder as its readers run
    them: every one exits 0. Scenario 4 and 5 reuse the default --save_dir with a new
    --loss_type / --pose_loss_weight each: each is a new run, and every earlier run's files are
    kept beside the folder, named; a re-run with a changed --lr trains with it likewise. The
    two-stage recipe (scenario 1): stage 2 starts from stage 1's best weights with a fresh
    optimizer and trains the generator stage 1 kept frozen; a --resume that does not fit the
    model, and stage 2's command with fewer epochs than it trained, are refused before Ray,
    touching nothing written."""
    render_dataset(tmp_path, SyntheticSpec(num_identities=8, frames_per_identity=8, seed=3))
    # Then the guide's last scenario-5 command again with another --lr, in the same folder.
    last = next(c for c in reversed(guide_commands()) if "0.01" in c)
    extra = [
        [*shortened(last), "--lr", "5e-3"],
        _stage2("--num_control_layers", "2"),
        _stage2("--epochs", "1"),
    ]
    code = (
        "import sys, json; from pathlib import Path; "
        "from tests.test_original_guide import run_guide_in_order; "
        "run_guide_in_order(Path(sys.argv[1]), json.loads(sys.argv[2]))"
    )
    env = dict(train_env(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), json.dumps(extra)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    rcs = re.findall(r"^GUIDE_RC (\d+) (.*)$", proc.stdout, flags=re.M)
    assert proc.returncode == 0 and len(rcs) == len(guide_commands()) + len(extra), out[-6000:]
    expected = ["0"] * (len(guide_commands()) + 1) + ["2", "2"]
    assert [rc for rc, _ in rcs] == expected, "\n".join(f"{rc} {a}" for rc, a in rcs)

    # Every scenario's own folder holds the original's files.
    folders = ["checkpoints_image", *(str(BASE / f"checkpoints_image{s}") for s in (
        "", "_stage1", "_stage2", "_amp", "_accum", "_resume", "_small", "_test"))]  # fmt: skip
    for folder in folders:
        for name in (run_files.BEST_MODEL, run_files.FINAL_MODEL, run_files.HISTORY):
            assert (tmp_path / folder / name).is_file(), (folder, name)

    # Scenario 4 and 5 share ./checkpoints_image: the first command's run continues with
    # "--loss_type mse" (its settings), each later one is a new run; the earlier ones moved.
    def loss_and_weight(path: Path) -> tuple[str, float]:
        optim = _config(path / run_files.FINAL_MODEL)["optim"]
        return optim["loss_type"], optim["pose_loss_weight"]

    kept = sorted(tmp_path.glob("checkpoints_image.*"), key=lambda p: p.stat().st_mtime)
    assert [loss_and_weight(p) for p in kept] == [
        ("mse", 0.1), ("l1", 0.1), ("combined", 0.1), ("mse", 0.5), ("mse", 0.01)
    ]  # fmt: skip
    assert len(re.findall(r"a new run \(other settings\): moved", out)) >= 4
    assert "--loss_type mse -> l1" in out and "--pose_loss_weight 0.5 -> 0.01" in out

    # The changed --lr: trained with it, the previous run's files kept and named.
    assert "(--lr 0.0001 -> 0.005)" in out
    assert _config(kept[-1] / run_files.FINAL_MODEL)["optim"]["lr"] == 1e-4
    assert _config(kept[-1] / run_files.FINAL_MODEL)["optim"]["pose_loss_weight"] == 0.01
    assert _config(tmp_path / "checkpoints_image" / run_files.FINAL_MODEL)["optim"]["lr"] == 5e-3

    # The two-stage recipe.
    stage1 = _state(BASE / "checkpoints_image_stage1" / run_files.BEST_MODEL, tmp_path)
    stage2 = _state(BASE / "checkpoints_image_stage2" / run_files.FINAL_MODEL, tmp_path)
    generator = [k for k in stage1 if k.startswith("generator.")]
    assert generator and any(not torch.equal(stage1[k], stage2[k]) for k in generator)
    assert "fresh optimizer" in out and "trainable set changed" in out
    assert "num_control_layers" in out and "--epochs 2 -> 1" in out  # the two refusals
    history = json.loads(
        (tmp_path / BASE / "checkpoints_image_stage2" / run_files.HISTORY).read_text()
    )
    assert [h["epoch"] for h in history["val"]] == [1, 2]


def _state(rel: Path, root: Path) -> dict:
    return torch.load(root / rel, map_location="cpu", weights_only=False)["model_state_dict"]
