"""Bad input and broken numbers against the real training CLI (subprocesses, as a user runs it).

The fast cases stop before Ray starts; the ``slow`` ones run a tiny training through a real
local Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controlnet_ray import run_files
from tests.datasets import make_legacy_fixture
from tests.train_helpers import TINY, run_train


def _one_line_rc2(proc) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert "resources:" not in proc.stdout  # Ray was never started
    return err


# Against a cluster (--address) shards are prepared after connecting, but the data is still read
# and checked before: nothing listens at this address, so reaching Ray would fail differently.
@pytest.mark.parametrize("cluster", [[], ["--address", "127.0.0.1:9"]], ids=["local", "cluster"])
def test_impossible_landmarks_stop_train_in_one_line_before_ray(tmp_path: Path, cluster: list):
    fx = make_legacy_fixture(tmp_path / "repo", frames_per_person=3)
    doc = fx.load_json("video")
    doc["landmarks_2d"][4] = [[1e4, 1e4]] * 5
    fx.save_json("video", doc)
    person = doc["metadata"][4]["person_name"]
    args = ["--data_dir", str(fx.data_dir), "--save_dir", "ck", *cluster]
    proc = run_train(args, tmp_path, timeout=120)
    err = _one_line_rc2(proc)
    assert f"video_metadata.json: entry 4 (person '{person}'): field 'landmarks_2d'" in err
    assert not list((tmp_path / "ck" / "ray_results").iterdir())  # no Ray run begun


@pytest.mark.parametrize("flag", ["--save_dir", "--log_dir", "--cache_dir"])
def test_output_folder_that_is_a_file_is_one_line_before_ray(tmp_path: Path, flag: str):
    (tmp_path / "taken").write_text("not a folder")
    args = ["--save_dir", "ck", "--log_dir", "logs", flag, "taken/sub"]
    err = _one_line_rc2(run_train(args, tmp_path, timeout=120))
    assert f"{flag} " in err and "taken is a file" in err


# --------------------------------------------------------------------------- through Ray


@pytest.mark.slow
def test_diverging_run_fails_and_saves_nothing(tmp_path: Path):
    """lr 1e30 is finite, so it passes validation; the first step blows the weights up. The
    run must fail naming the cause, and no .pth may be written (no untrained or NaN model)."""
    args = [*TINY, "--epochs", "1", "--lr", "1e30", "--max_failures", "0", "--save_dir", "ck"]
    proc = run_train(args, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("training failed: ")]
    assert "NonFiniteLossError" in line and "non-finite" in line, out[-4000:]
    assert not list((tmp_path / "ck").glob("*.pth"))
    assert not (tmp_path / "ck" / run_files.HISTORY).exists()
