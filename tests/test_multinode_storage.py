"""A multi-node Ray cluster whose head has no CPUs (as the shipped manifests start it), so rank 0
runs on another node than the driver, with a real S3-compatible server on loopback as
``--storage_path``.

The cluster (``ray.cluster_utils.Cluster``) lives in a subprocess, which also runs the CLI's
``main`` three times against it: with the default and with a relative storage path (both
refused before training, naming the flag), then with ``s3://``. The driver's ``--save_dir`` /
``--log_dir`` must then hold the original's files, copied down from the bucket, and the bucket
everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from controlnet_ray import run_files
from controlnet_ray.storage import SAVE_DIR
from tests.train_helpers import TINY, TINY_FILES, train_env

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import sys

    import ray
    from ray.cluster_utils import Cluster

    from controlnet_ray.train import main

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    at = sys.argv.index("--storage_path")
    common = ["--address", cluster.address, "--progress", "lines"]
    try:
        refused = main(sys.argv[1:at] + common)  # the default storage path
        print(f"REFUSED_RC {refused}", flush=True)
        relative = main(sys.argv[1:at] + ["--storage_path", "rel"] + common)
        print(f"RELATIVE_RC {relative}", flush=True)
        rc = main(sys.argv[1:] + common)
    finally:
        ray.shutdown()  # the driver first: Cluster refuses to remove the node it is on
        cluster.shutdown()
    sys.exit(rc)
    """
)


def test_rank0_on_another_node_leaves_everything_in_s3_and_on_the_driver(
    tmp_path: Path, s3_server
) -> None:
    uri = s3_server(f"{tmp_path.name}/ray")
    args = [*TINY, "--save_dir", "ck", "--log_dir", "logs", "--no_judge", "--storage_path", uri]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        cwd=tmp_path,
        env=train_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    (tmp_path / "out.txt").write_text(out)
    assert "REFUSED_RC 2" in out and "pass --storage_path" in out, out[-4000:]
    assert "RELATIVE_RC 2" in out and "--storage_path rel is relative" in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    save = tmp_path / "ck"
    for name in TINY_FILES:
        assert (save / name).is_file(), name
    # nothing of Ray's on the driver's disk (the refused run's checks made the empty folder)
    assert not [p for p in (save / "ray_results").rglob("*") if p.is_file()]
    history = json.loads((save / run_files.HISTORY).read_text())
    assert [h["epoch"] for h in history["val"]] == [1, 2]
    acc = EventAccumulator(str(tmp_path / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("Epoch/ValPSNR")] == [1, 2]
    fs, base = pafs.FileSystem.from_uri(uri)
    stored = {
        i.path[len(base) :].split("/", 2)[-1]
        for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if i.type == pafs.FileType.File
    }
    assert {f"{SAVE_DIR}/{name}" for name in TINY_FILES} <= stored, stored
    state_file = f"/{run_files.RAY_STATE_FILE}"
    assert any(p.startswith("checkpoint_") and p.endswith(state_file) for p in stored), stored
    assert any(p.startswith("log_dir/events.out.tfevents") for p in stored), stored
