"""A multi-node Ray cluster whose head has no CPUs (as the shipped manifests start it), so rank 0
runs on another node than the driver, with a real S3-compatible server on loopback as
``--storage_path``.

The cluster (``ray.cluster_utils.Cluster``) lives in a subprocess, run once for this module,
which also runs the CLI's ``main`` against it: with the default and with a relative storage path
(both refused before training, naming the flag, and before preparing any data); where this
process may make mount namespaces, with a local ``--storage_path`` while a third node joins from
its own mount namespace, seeing an empty tmpfs there (refused, naming the flag and that node;
the node is then stopped); then with ``s3://``. The driver's ``--save_dir`` / ``--log_dir`` must
then hold the original's files, copied down from the bucket, and the bucket everything. The runs
use a fresh ``--cache_dir``, so the training run prepares its shards and trains its judges on
first use: after connecting, as Ray tasks on the worker node (the head has no CPUs), not in the
driver's process pool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
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
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    from controlnet_ray.train import main


    def alive() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


    def wait_for(count: int, what: str) -> set[str]:
        \"\"\"Poll the GCS until ``count`` nodes are alive (a condition, not a fixed sleep).\"\"\"
        deadline = time.monotonic() + 120
        while len(nodes := alive()) != count:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what}: {len(nodes)} nodes alive after 120 s, not {count}")
            time.sleep(0.1)
        return nodes


    def refused_by_a_node_without_the_folder(argv: list[str], folder: str) -> None:
        \"\"\"A third node joins from its own mount namespace, where ``folder`` is an empty tmpfs;
        a run with ``--storage_path folder`` must be refused; the node is then stopped.\"\"\"
        before = alive()
        ray_cli = str(Path(sys.executable).parent / "ray")
        script = 'mount -t tmpfs tmpfs "$0" && exec "$1" start --address "$2" --num-cpus 1 --block'
        node = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
             folder, ray_cli, cluster.address],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            (new,) = wait_for(len(before) + 1, "the namespaced node joining") - before
            address = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == new)
            print(f"HIDDEN_NODE {address}", flush=True)
            hidden = main(argv + ["--storage_path", folder])
            print(f"HIDDEN_RC {hidden}", flush=True)
        finally:
            node.terminate()  # ray start drains and stops its raylet on SIGTERM
            node.wait(timeout=120)
        wait_for(len(before), "the namespaced node leaving")


    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)  # main() joins this connection
    print(f"HEAD_NODE {cluster.head_node.node_id} WORKER_NODE {worker.node_id}", flush=True)
    at = sys.argv.index("--storage_path")
    common = ["--address", cluster.address, "--progress", "lines"]
    try:
        refused = main(sys.argv[1:at] + common)  # the default storage path
        print(f"REFUSED_RC {refused}", flush=True)
        relative = main(sys.argv[1:at] + ["--storage_path", "rel"] + common)
        print(f"RELATIVE_RC {relative}", flush=True)
        if private := os.environ.get("PRIVATE_FOLDER"):
            refused_by_a_node_without_the_folder(sys.argv[1:at] + common, private)
        print("TRAINING_RUN", flush=True)
        rc = main(sys.argv[1:] + common)
    finally:
        ray.shutdown()  # the driver first: Cluster refuses to remove the node it is on
        cluster.shutdown()
    sys.exit(rc)
    """
)


def _why_no_private_mounts(folder: Path) -> str | None:
    """None when this process may start a mount namespace with a tmpfs in it, else why not."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0"']
        + [str(folder)],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"no private tmpfs mounts here: {(probe.stderr or probe.stdout).strip()}"
    return None


@dataclass
class ClusterRun:
    """What the subprocess printed and where its runs wrote."""

    tmp: Path
    uri: str
    cache: Path
    proc: subprocess.CompletedProcess
    no_namespace: str | None  # why the namespaced node was not tried, or None

    @property
    def out(self) -> str:
        return self.proc.stdout + self.proc.stderr


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory, s3_server) -> ClusterRun:
    """The subprocess, run once for the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("multinode")
    uri = s3_server(f"{tmp_path.name}/ray")
    cache = tmp_path / "fresh_cache"  # the session's cache may already hold these shards
    private = tmp_path / "private_storage"  # a tmpfs on the namespaced node
    private.mkdir()
    no_namespace = _why_no_private_mounts(private)
    env = train_env(tmp_path)
    if no_namespace is None:
        env["PRIVATE_FOLDER"] = str(private)
    args = [*TINY, "--save_dir", "ck", "--log_dir", "logs", "--cache_dir", str(cache)]
    args += ["--storage_path", uri]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (tmp_path / "out.txt").write_text(proc.stdout + proc.stderr)
    return ClusterRun(tmp_path, uri, cache, proc, no_namespace)


def test_a_node_that_does_not_see_the_storage_path_is_refused(cluster_run: ClusterRun) -> None:
    """A node in its own mount namespace (an empty tmpfs where the driver has
    ``--storage_path``) makes the run fail before training, in one line naming the flag, the
    folder and that node's address."""
    if cluster_run.no_namespace:
        pytest.skip(cluster_run.no_namespace)
    out = cluster_run.out
    assert "HIDDEN_RC 2" in out, out[-4000:]
    address = re.search(r"HIDDEN_NODE (\S+)", out)
    assert address, out[-4000:]
    folder = cluster_run.tmp / "private_storage"
    line = f"error: --storage_path {folder} is not shared: node(s) {address.group(1)} do not see it"
    assert line in out, out[-4000:]


def test_rank0_on_another_node_leaves_everything_in_s3_and_on_the_driver(
    cluster_run: ClusterRun,
) -> None:
    tmp_path, uri, proc = cluster_run.tmp, cluster_run.uri, cluster_run.proc
    out = cluster_run.out
    assert "REFUSED_RC 2" in out and "pass --storage_path" in out, out[-4000:]
    assert "RELATIVE_RC 2" in out and "--storage_path rel is relative" in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    _assert_prepared_by_ray_tasks_on_the_worker(proc.stdout, cluster_run.cache)
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


def _assert_prepared_by_ray_tasks_on_the_worker(stdout: str, cache: Path) -> None:
    """The refused runs checked the data but prepared nothing; the training run prepared its
    shards (pose fitting, decode + align) and trained its judges after connecting, as Ray
    tasks that all ran on the worker node (the head has 0 CPUs and the driver runs on it),
    and published them in the cache."""
    ids = re.search(r"HEAD_NODE (\w+) WORKER_NODE (\w+)", stdout)
    assert ids, stdout[-4000:]
    head, worker = ids.groups()
    refused, training = stdout.split("TRAINING_RUN", 1)
    assert "shards: not prepared yet" in refused and "decode+align" not in refused, refused
    assert "shards: not prepared yet" in training, training[-4000:]
    ran_on = re.search(r"decode\+align: Ray tasks ran on node\(s\) (.+)", training)
    assert ran_on, training[-4000:]
    assert ran_on.group(1).strip() == worker != head, (ran_on.group(1), head, worker)
    fitted_on = re.search(r"pose: Ray tasks ran on node\(s\) (.+)", training)
    judged_on = re.search(r"judges: trained by a Ray task on node (\w+)", training)
    assert fitted_on and judged_on, training[-4000:]
    assert fitted_on.group(1).strip() == judged_on.group(1) == worker, training[-4000:]
    assert len(list((cache / "judges").glob("*.pt"))) == 2
    manifests = list((cache / "shards").glob("*/manifest.json"))
    assert len(manifests) == 1, manifests
    assert json.loads(manifests[0].read_text())["counts"]["total"]["images"] > 0
