"""A multi-node Ray cluster whose head has no CPUs (as the shipped manifests start it), so rank 0
runs on another node than the driver, with a real S3-compatible server on loopback as
``--storage_path``; the worker node comes from a real Ray autoscaler.

The cluster lives in a subprocess, run once for this module: a head
(``ray.cluster_utils.Cluster``) with 0 CPUs and the ``driver_node`` resource, whose autoscaler
(Ray's ``fake_multinode`` provider, which starts nodes as local raylets) may add one 3-CPU node,
and no node besides the head at start. It runs the CLI's ``main`` against it: with the default
and with a relative storage path (both refused before training, naming the flag, and before
preparing any data); where this process may make mount namespaces, with a local
``--storage_path`` while a node joins by hand from its own mount namespace, seeing an empty
tmpfs there (refused, naming the flag and that node; the node is then stopped); then with
``s3://``, where the launcher finds 0 CPUs, asks the autoscaler for the run's resources and
waits until its node is up. The driver's ``--save_dir`` / ``--log_dir`` must then hold the
original's files, copied down from the bucket, and the bucket everything. The runs use a fresh
``--cache_dir``, so the training run prepares its shards and trains its judges on first use:
after connecting, as Ray tasks on the autoscaled node (the head has no CPUs), not in the
driver's process pool. Then a sweep trial is placed on the same cluster: the trial on the head,
its Train worker on the worker node. The script stops its own processes only (never ``ray
stop``, which would stop every Ray on the machine), including the autoscaler's nodes, which the
head's shutdown leaves running.
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
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    # Read by the autoscaler (the monitor process the head starts, which inherits them): the
    # fake provider refuses to run without RAY_FAKE_CLUSTER; one update a second, not five.
    os.environ.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")

    import ray
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    from controlnet_ray.train import main
    from controlnet_ray.tune import DRIVER_RESOURCE, SweepPlan

    WORKER_TYPE = "cpu_worker"
    WORKER_CPUS = 3


    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]


    def autoscaling_config(gcs_address: str, head: dict) -> dict:
        \"\"\"Ray's fake_multi_node/example.yaml (not in the wheel), with one worker type that
        the autoscaler launches as a local raylet, and no node at start.\"\"\"
        return {
            "cluster_name": "fake_multinode",
            "max_workers": 1,
            "provider": {
                "type": "fake_multinode",
                "gcs_address": gcs_address,  # else it assumes port 6379
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
                WORKER_TYPE: {
                    "resources": {"CPU": WORKER_CPUS, "object_store_memory": 150 * 2**20},
                    "node_config": {},
                    "min_workers": 0,
                    "max_workers": 1,
                },
            },
            "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 60,  # never scaled down while this script runs
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }  # fmt: skip


    def start_autoscaling_head() -> Cluster:
        \"\"\"A 0-CPU head with the driver resource, as cluster/ starts it, whose autoscaler
        adds a WORKER_CPUS node on demand (never AutoscalingCluster: it runs `ray stop
        --force`, which would stop every Ray on this machine).\"\"\"
        head = {"CPU": 0, DRIVER_RESOURCE: 1}
        port = free_port()
        config = Path("autoscaler.json").resolve()
        config.write_text(json.dumps(autoscaling_config(f"{get_node_ip_address()}:{port}", head)))
        args = {"num_cpus": 0, "resources": {DRIVER_RESOURCE: 1}}
        return Cluster(
            initialize_head=True,
            head_node_args={**args, "gcs_server_port": port, "autoscaling_config": str(config)},
        )


    def descendants() -> list[int]:
        \"\"\"PIDs of every process below this one (read from /proc).\"\"\"
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(stat.parent.name))
        found, todo = [], [os.getpid()]
        while todo:
            found += (kids := children.get(todo.pop(), []))
            todo += kids
        return found


    def running(pids: list[int]) -> list[int]:
        def alive(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except (OSError, IndexError):
                return False

        return [p for p in pids if alive(p)]


    def stop_cluster(cluster: Cluster) -> None:
        \"\"\"Stop the head, then the processes it leaves behind: the autoscaler's nodes are
        started by its monitor process, so killing that orphans them. Only this script's own
        descendants are stopped (never `ray stop`); what is still running after is printed.\"\"\"
        ray.shutdown()  # the driver first: Cluster refuses to remove the node it is on
        ours = descendants()
        cluster.shutdown()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in running(ours):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 20
            while running(ours) and time.monotonic() < deadline:
                time.sleep(0.1)
        print(f"STRAY_PROCESSES {running(ours + descendants()) or 'none'}", flush=True)


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
        \"\"\"A node joins by hand from its own mount namespace, where ``folder`` is an empty
        tmpfs; a run with ``--storage_path folder`` must be refused; the node is then stopped.\"\"\"
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


    def trial(config: dict) -> None:
        \"\"\"A sweep trial as tune places it (0 CPUs, on the driver resource) whose Train
        worker writes the node it ran on.\"\"\"
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer

        out = Path(config["out"])

        def loop():
            (out / "worker_node").write_text(ray.get_runtime_context().get_node_id())

        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1)).fit()
        (out / "trial_node").write_text(ray.get_runtime_context().get_node_id())


    def place_a_trial(out: Path) -> None:
        from ray import tune

        out.mkdir()
        plan = SweepPlan(1, 0.0, 1.0, 1, None, on_driver_nodes=True)
        tune.Tuner(
            tune.with_resources(trial, plan.trial_resources()),
            param_space={"out": str(out)},
            run_config=tune.RunConfig(storage_path=str(out / "store"), name="p"),
        ).fit()


    cluster = start_autoscaling_head()
    try:
        ray.init(address=cluster.address)  # main() joins this connection
        print(f"HEAD_NODE {cluster.head_node.node_id}", flush=True)
        at = sys.argv.index("--storage_path")
        common = ["--address", cluster.address, "--progress", "lines"]
        refused = main(sys.argv[1:at] + common)  # the default storage path
        print(f"REFUSED_RC {refused}", flush=True)
        relative = main(sys.argv[1:at] + ["--storage_path", "rel"] + common)
        print(f"RELATIVE_RC {relative}", flush=True)
        if private := os.environ.get("PRIVATE_FOLDER"):
            refused_by_a_node_without_the_folder(sys.argv[1:at] + common, private)
        print(f"TRAINING_RUN alive before: {' '.join(sorted(alive()))}", flush=True)
        rc = main(sys.argv[1:] + common)
        print(f"TRAINING_RC {rc}", flush=True)
        place_a_trial(Path("placement").resolve())
        print(f"PLACEMENT_NODES alive after: {' '.join(sorted(alive()))}", flush=True)
    finally:
        stop_cluster(cluster)
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

    def training(self) -> str:
        """What the script printed from the training run on."""
        assert "TRAINING_RUN" in self.proc.stdout, self.out[-4000:]
        return self.proc.stdout.split("TRAINING_RUN", 1)[1]

    def head(self) -> str:
        found = re.search(r"HEAD_NODE (\w+)", self.proc.stdout)
        assert found, self.out[-4000:]
        return found.group(1)

    def worker(self) -> str:
        """The one node the training run's shard preparation tasks ran on."""
        found = re.search(r"decode\+align: Ray tasks ran on node\(s\) (.+)", self.proc.stdout)
        assert found, self.out[-4000:]
        return found.group(1).strip()


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
    _assert_prepared_by_ray_tasks_on_the_worker(cluster_run)
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


def test_the_autoscaler_launched_the_worker_node_for_the_training_run(
    cluster_run: ClusterRun,
) -> None:
    """Only the head was alive when the training run started; the run asked the autoscaler for
    its resources and waited (the launcher's request, not a node added by hand), and the node
    its shards were prepared on is the fake provider's first launch."""
    training = cluster_run.training()
    assert f"alive before: {cluster_run.head()}\n" in training, training[:2000]
    asked = "the cluster has 0 CPU; asked the autoscaler, waiting up to 600 s (--resource_wait_s)"
    assert asked in training and "resources: ready after" in training, training[-4000:]
    ready, prepared = (training.find(s) for s in ("resources: ready after", "decode+align: Ray"))
    assert 0 <= ready < prepared, training[-4000:]  # the nodes came before the preparation
    assert cluster_run.worker() == _first_autoscaled_node_id(), training[-4000:]


def test_trials_run_on_the_driver_node_and_their_workers_elsewhere(cluster_run: ClusterRun):
    """The head has 0 CPUs and the driver resource (as in cluster/): a sweep trial (CPU-less,
    on the driver resource) starts on the head, and its Train worker runs on the worker node."""
    out = cluster_run.tmp / "placement"
    assert (out / "trial_node").is_file(), cluster_run.out[-4000:]
    assert (out / "trial_node").read_text() == cluster_run.head()
    assert (out / "worker_node").read_text() == cluster_run.worker()


def test_nothing_of_the_cluster_keeps_running(cluster_run: ClusterRun) -> None:
    """The autoscaler's nodes outlive the head's processes (its monitor started them): the
    script stops them too, and nothing it started is left."""
    assert "STRAY_PROCESSES none" in cluster_run.proc.stdout, cluster_run.out[-4000:]


def _first_autoscaled_node_id() -> str:
    """The node ID Ray's fake provider gives the first node it launches (it numbers them)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    return FAKE_HEAD_NODE_ID[:-5] + "00001"


def _assert_prepared_by_ray_tasks_on_the_worker(run: ClusterRun) -> None:
    """The refused runs checked the data but prepared nothing; the training run prepared its
    shards (pose fitting, decode + align) and trained its judges after connecting, as Ray
    tasks that all ran on the worker node (the head has 0 CPUs and the driver runs on it),
    and published them in the cache."""
    stdout = run.proc.stdout
    refused, training = stdout.split("TRAINING_RUN", 1)
    assert "shards: not prepared yet" in refused and "decode+align" not in refused, refused
    assert "shards: not prepared yet" in training, training[-4000:]
    worker = run.worker()
    assert worker != run.head()
    fitted_on = re.search(r"pose: Ray tasks ran on node\(s\) (.+)", training)
    judged_on = re.search(r"judges: trained by a Ray task on node (\w+)", training)
    assert fitted_on and judged_on, training[-4000:]
    assert fitted_on.group(1).strip() == judged_on.group(1) == worker, training[-4000:]
    assert len(list((run.cache / "judges").glob("*.pt"))) == 2
    manifests = list((run.cache / "shards").glob("*/manifest.json"))
    assert len(manifests) == 1, manifests
    assert json.loads(manifests[0].read_text())["counts"]["total"]["images"] > 0
