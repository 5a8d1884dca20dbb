"""benchmarks/gpu_path.py end to end in its tiny CPU mode: engine, pipeline and Ray path run,
the figures are written, GPU-only figures are 'n/a' (the script is meant for a GPU machine,
where it must not fail on its first run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_helpers import train_env

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_path.py"


@pytest.mark.slow
def test_gpu_path_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_path.json"
    tiny = ["--device", "cpu", "--steps", "3", "--warmup", "1", "--epochs", "2",
            "--pipeline_epochs", "1", "--batch_size", "8", "--image_size", "64",
            "--synthetic_identities", "8", "--synthetic_frames", "8"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *tiny, "--json", str(out)],
        cwd=tmp_path,
        env=train_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    for part in ("engine", "pipeline", "ray"):
        assert result[part]["samples_per_s"] > 0, part
    assert result["engine"]["flops_per_sample"] > 1e8  # fwd + bwd of the default model at 64 px
    assert result["mfu_engine"] is None and result["engine"]["busy_mean"] is None
    assert "ray / engine" in proc.stdout and "n/a" in proc.stdout
