"""The CLI in a subprocess: what fails before training starts.

The whole command in a terminal -- files, TensorBoard tags read back with TensorBoard's reader,
the progress bar -- is ``tests/test_original_guide.py``'s full-configuration run; resuming and
re-running are ``tests/test_resume_faults.py`` and ``tests/test_bad_input_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train_helpers import TINY, run_train

pytestmark = pytest.mark.slow


def test_use_gpu_without_gpus_fails_fast(tmp_path: Path):
    """A local Ray cannot grow: no GPU here is known before Ray starts and the data is read."""
    proc = run_train([*TINY, "--use_gpu", "--save_dir", "ck"], tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "--use_gpu" in proc.stderr and "GPU" in proc.stderr
    assert "Ray" not in proc.stdout and "shards" not in proc.stdout  # before Ray and the data
