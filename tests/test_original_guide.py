"""Every command of the original script's guide works as ``python -m controlnet_ray.train``.

The guide (../shared/reference/original-model2-training-guide.zh.md) is what users run today,
from the original repo's root. Each command is parsed from a folder laid out like that repo; the
full-configuration form (with its quirky ``--image_dir train/datas/file``) is also trained for
real on a tiny dataset in the original layout.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest

from controlnet_ray import run_files
from controlnet_ray.cli import parse_train_args
from controlnet_ray.data.synthetic import SyntheticSpec, render_dataset
from tests.train_helpers import run_train_in_pty, scalars

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
