"""Driver side of a run: data preparation, Ray start-up, resource planning, the TorchTrainer.

Resource planning exists because of two traps measured with Ray 2.60: Ray Data hangs forever
without a CPU left beside the training workers, and a GPU request on a GPU-less cluster is
retried forever instead of failing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlnet_ray import capacity, run_files
from controlnet_ray.capacity import DATA_CPUS, Need
from controlnet_ray.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from controlnet_ray.data.pipeline import PairDatasets

MIRROR_INTERVAL_S = 10.0  # how often the driver copies new outputs down while a run trains
PROBE_TIMEOUT_S = 120.0  # for every node to answer whether it sees a path


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors our own checks raise for bad input (flags, data, checkpoints, weights)."""
    from controlnet_ray.checkpoint import CheckpointError
    from controlnet_ray.data.layout import DataError
    from controlnet_ray.model.iresnet import WeightsError

    return (ConfigError, DataError, CheckpointError, WeightsError)


EXPECTED_ERRORS = _expected_errors()


@dataclass
class ResourcePlan:
    """How many CPUs Ray sees and how they are shared between training and data."""

    ray_num_cpus: int | None  # logical CPUs for a local Ray; None: use the cluster as is
    cpus_per_worker: float
    torch_threads: int

    def describe(self, cfg: TrainConfig) -> str:
        return (
            f"{cfg.ray.num_ray_workers} training worker(s) x {self.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if cfg.ray.use_gpu else ''}, {DATA_CPUS:g} CPU kept for Ray Data, "
            f"{self.torch_threads} torch thread(s) per worker"
        )


def plan_resources(cfg: TrainConfig, available_cpus: float, local: bool) -> ResourcePlan:
    """Share the CPUs so that Ray Data always keeps one, whatever the worker count.

    Locally Ray gets the machine's core count as logical CPUs; when that is too small for the
    requested workers (e.g. 2 workers on 2 cores) each worker reserves a fraction of a CPU.
    Whether a cluster holds the plan is :func:`resource_need`'s business.
    """
    n = cfg.ray.num_ray_workers
    if cfg.ray.cpus_per_worker is not None:
        cpw = cfg.ray.cpus_per_worker
    else:
        cpw = min(1.0, max(0.25, (available_cpus - DATA_CPUS) / n))
    needed = n * cpw + DATA_CPUS
    ray_cpus = max(int(available_cpus), int(needed + 0.999)) if local else None
    threads = max(1, int((available_cpus - DATA_CPUS) // n)) if not cfg.ray.use_gpu else 2
    return ResourcePlan(ray_num_cpus=ray_cpus, cpus_per_worker=cpw, torch_threads=threads)


def resource_need(cfg: TrainConfig, plan: ResourcePlan) -> Need:
    """What the run holds at once: its workers (a GPU each with --use_gpu) and Ray Data's CPU."""
    n, cpw, gpu = cfg.ray.num_ray_workers, plan.cpus_per_worker, cfg.ray.use_gpu
    worker = {"CPU": cpw, "GPU": 1.0} if gpu else {"CPU": cpw}
    totals = {"CPU": n * cpw + DATA_CPUS, **({"GPU": float(n)} if gpu else {})}
    return Need(
        totals=totals,
        bundles=(*[worker] * n, {"CPU": DATA_CPUS}),
        flags=(
            f"--num_ray_workers {n} x (--cpus_per_worker {cpw:g}"
            f"{' + 1 GPU for --use_gpu' if gpu else ''}) + {DATA_CPUS:g} CPU for Ray Data"
        ),
        remedy="lower --num_ray_workers or --cpus_per_worker"
        + ("; drop --use_gpu to train on CPU" if gpu else ""),
    )


def resolve_shards(cfg: TrainConfig) -> Path:
    """Shards for this run: the embedded synthetic set or the user's --data_dir, prepared once."""
    from controlnet_ray.data.shards import ensure_shards

    data = cfg.data
    if data.data_dir is None:
        from controlnet_ray.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

        spec = SyntheticSpec(
            num_identities=data.synthetic_identities,
            frames_per_identity=data.synthetic_frames,
            seed=data.synthetic_seed,
        )
        data_dir = ensure_synthetic_dataset(
            data.resolved_cache_dir(), spec, num_workers=max(1, data.num_workers)
        )
        print(
            f"data: embedded synthetic dataset ({spec.num_identities} identities x "
            f"{spec.frames_per_identity} frames) at {data_dir}",
            flush=True,
        )
        data = _replace_data_dir(cfg, str(data_dir))
    return ensure_shards(data)


def _replace_data_dir(cfg: TrainConfig, data_dir: str):
    import dataclasses

    return dataclasses.replace(cfg.data, data_dir=data_dir, image_dir=None)


def init_ray(cfg: TrainConfig, plan_cpus: int | None) -> bool:
    """Connect to --address/$RAY_ADDRESS, or start a local Ray sized by the plan; True when
    this call started a local Ray (its caller then owns its shutdown)."""
    import ray

    # A local Ray's processes inherit these: Ray Data's actors then log warnings only.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    else:
        # A local Ray shares the machine with the training workers: without Prometheus metrics
        # collection and event-loop stats its processes use measurably less CPU (2 DDP workers
        # on 2 cores got 86 % of a core each instead of 80 %). The environment can override.
        for name in ("RAY_enable_metrics_collection", "RAY_event_stats"):
            os.environ.setdefault(name, "false")
        # Ray Data reads Parquet footers with up to 32 actors, each holding a CPU: on a small
        # machine they starve the training workers. A cluster keeps Ray's default.
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
        # The dashboard is kept (the default): Ray's State API behind it cleans up the placement
        # groups of finished or stopped runs.
        # address="local": always a new Ray of this run's size. Without it ray.init() joins
        # whatever cluster /tmp/ray/ray_current_cluster names (a `ray start` left running on
        # the machine), and then fails on num_cpus.
        ray.init(address="local", num_cpus=plan_cpus, log_to_driver=True)
        return True


def build_pairs(cfg: TrainConfig, shards: Path) -> PairDatasets:
    """The pair datasets, built on the driver once per run (or once per sweep)."""
    from controlnet_ray.data.pipeline import build_pair_datasets

    pairs = build_pair_datasets(shards, cfg.data, seed=cfg.ray.seed)
    print(
        f"pairs: {pairs.num_train_pairs} train, {pairs.num_val_pairs} val "
        f"({cfg.data.pair_mode}, {cfg.data.min_pose_distance:g}-"
        f"{cfg.data.max_pose_distance:g} deg)",
        flush=True,
    )
    return pairs


def build_trainer(
    cfg: TrainConfig,
    plan: ResourcePlan,
    pairs: PairDatasets,
    *,
    progress_board: Any | None = None,
    callbacks: Sequence[Any] = (),
):
    """The TorchTrainer for this run (Train v2 API).

    ``progress_board``: the driver's console actor (see :mod:`controlnet_ray.progress`); without
    one the lines are printed where they arise. ``callbacks``: extra Train callbacks (Tune's).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from controlnet_ray.epoch_lines import EpochLines
    from controlnet_ray.worker import train_loop_per_worker

    scaling = ScalingConfig(
        num_workers=cfg.ray.num_ray_workers,
        use_gpu=cfg.ray.use_gpu,
        resources_per_worker={"CPU": plan.cpus_per_worker},
    )
    run_config = RunConfig(
        name=cfg.run_name(),
        storage_path=cfg.storage_path(),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.ray.num_to_keep,
            checkpoint_score_attribute=cfg.output.best_metric,
            checkpoint_score_order=run_files.score_order(cfg.output.best_metric),
        ),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        logging_config=LoggingConfig(log_level="WARNING"),
        callbacks=[EpochLines(progress_board), *callbacks],
    )
    loop_config = {
        "config": cfg.to_dict(),
        "shards_dir": str(pairs.shards_dir),
        "num_train_pairs": pairs.num_train_pairs,
        "torch_threads": plan.torch_threads,
        "progress_board": progress_board,
        "resume_state": resume_state_ref(cfg),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        datasets={"train": pairs.train, "val": pairs.val},
    )


def resume_state_ref(cfg: TrainConfig) -> Any:
    """--resume read here, where the path was given, and put in Ray's object store (None
    without --resume): rank 0 takes it from there, so the file need not exist on its node."""
    if not cfg.output.resume:
        return None
    import ray

    from controlnet_ray import checkpoint as ckpt

    return ray.put(ckpt.load_checkpoint(cfg.output.resume))


def discard_previous_run(cfg: TrainConfig) -> None:
    """--fresh: remove this run's Ray storage so nothing is resumed (local storage only)."""
    path = cfg.storage_path()
    if "://" in path:
        raise ConfigError("--fresh only works with a local --storage_path; pass a new --run_name")
    run_dir = Path(path) / cfg.run_name()
    if run_dir.exists():
        print(f"--fresh: removing previous Ray run at {run_dir}", flush=True)
        shutil.rmtree(run_dir)


def existing_run(cfg: TrainConfig) -> Path | None:
    path = cfg.storage_path()
    if "://" in path:
        return None
    run_dir = Path(path) / cfg.run_name()
    return run_dir if run_dir.exists() else None


RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train v2's record of a run


def latest_ray_checkpoint(run_dir: Path) -> Path | None:
    """The state file of the checkpoint Ray will resume ``run_dir`` from (None: none yet).

    Read from Ray's own snapshot, not guessed from folder names: a folder written but never
    registered (a worker killed while reporting) is not what Ray restores.
    """
    from controlnet_ray.run_files import RAY_STATE_FILE

    snapshot = run_dir / RAY_SNAPSHOT_FILE
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"{snapshot}: unreadable Ray run record ({exc}); --fresh starts the run over"
        ) from exc
    name = latest.get("checkpoint_dir_name")
    return run_dir / name / RAY_STATE_FILE if name else None


def prune_unregistered_checkpoints(run_dir: Path) -> list[Path]:
    """Remove checkpoint folders Ray never registered (a worker or driver killed between the
    upload and the report): Ray never resumes from them and never deletes them, so with
    ``--num_to_keep 2`` they pile up. Only folders absent from Ray's own record go."""
    snapshot = run_dir / RAY_SNAPSHOT_FILE
    try:
        doc = json.loads(snapshot.read_text()) if snapshot.is_file() else {}
    except (OSError, ValueError):
        return []  # unreadable record: check_rerun reports it; delete nothing on a guess
    results = [*(doc.get("checkpoint_results") or []), doc.get("latest_checkpoint_result")]
    registered = {r.get("checkpoint_dir_name") for r in results if isinstance(r, dict)}
    stale = [d for d in run_dir.glob("checkpoint_*") if d.is_dir() and d.name not in registered]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    if stale:
        print(f"removed {len(stale)} unregistered checkpoint folder(s) from {run_dir}", flush=True)
    return stale


def check_rerun(cfg: TrainConfig) -> None:
    """A re-run continues its Ray run only when its flags agree with that run's latest
    checkpoint; otherwise stop before Ray starts, naming each difference and the ways out."""
    from controlnet_ray import checkpoint as ckpt

    run_dir = None if cfg.ray.fresh else existing_run(cfg)
    state_file = latest_ray_checkpoint(run_dir) if run_dir is not None else None
    if run_dir is not None:
        prune_unregistered_checkpoints(run_dir)
    if state_file is None:
        return
    ways_out = (
        "--fresh starts this run over (its Ray checkpoints are deleted), a new --save_dir "
        f"starts a separate run, or --resume {cfg.output.save_dir}/{run_files.FINAL_MODEL} "
        "with a new --save_dir starts a new stage from its weights"
    )
    try:
        state = ckpt.load_checkpoint(state_file)
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"cannot continue Ray run {cfg.run_name()}: {exc}. {ways_out}") from exc
    plan = ckpt.plan_rerun(state, cfg)
    if plan.conflicts:
        raise ConfigError(
            f"--save_dir {cfg.output.save_dir} holds Ray run {cfg.run_name()} (at epoch "
            f"{plan.epoch}) trained with other settings: {'; '.join(plan.conflicts)}. "
            f"Re-run with its settings to continue it, or: {ways_out}"
        )
    for note in plan.notes:
        print(f"continuing Ray run {cfg.run_name()}: {note}", flush=True)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Resolve every relative path against the driver's cwd: Ray workers run elsewhere."""
    import dataclasses

    def resolve(p: str | None) -> str | None:
        return None if p is None or "://" in p else str(Path(p).expanduser().resolve())

    out = dataclasses.replace(
        cfg.output,
        save_dir=resolve(cfg.output.save_dir),
        log_dir=resolve(cfg.output.log_dir),
        resume=resolve(cfg.output.resume),
    )
    data = dataclasses.replace(
        cfg.data,
        data_dir=resolve(cfg.data.data_dir),
        image_dir=resolve(cfg.data.image_dir),
        cache_dir=str(cfg.data.resolved_cache_dir()),
    )
    model = dataclasses.replace(cfg.model, encoder_weights=resolve(cfg.model.encoder_weights))
    ray_opts = dataclasses.replace(
        cfg.ray, storage_path=cfg.storage_path(), run_name=cfg.run_name()
    )
    return dataclasses.replace(cfg, output=out, data=data, model=model, ray=ray_opts)


def check_resume_file(cfg: TrainConfig) -> None:
    """--resume must fit the model this run builds: say why not before Ray starts."""
    if not cfg.output.resume:
        return
    from controlnet_ray import checkpoint as ckpt
    from controlnet_ray.model import build_model, model_signature

    try:
        state = ckpt.load_checkpoint(cfg.output.resume)
        ckpt.check_model_compat(state, build_model(cfg.model), model_signature(cfg.model))
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"--resume: {exc}") from exc


def output_dirs(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(flag, folder) of everything a run writes locally; URIs (s3://...) are Ray's business."""
    dirs = [
        ("--save_dir", cfg.output.save_dir),
        ("--log_dir", cfg.output.log_dir),
        ("--cache_dir", str(cfg.data.resolved_cache_dir())),
        ("--storage_path", cfg.storage_path()),
    ]
    return [(flag, d) for flag, d in dirs if "://" not in d]


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> None:
    """Create ``path`` if needed and write a probe file in it; ConfigError naming ``flag``.

    A real write, not ``os.access``: that answers yes to root on a read-only mount, and the
    failure would otherwise surface inside a Ray actor, once per retry.
    """
    p = Path(path)
    blocker = next((a for a in (p, *p.parents) if a.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "" if blocker == p else f" ({blocker} is a file)"
        raise ConfigError(f"{flag} {path} is not a folder{where}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p, prefix=".write_probe_"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path} is not writable: {exc.strerror or exc}") from exc


def check_before_ray(cfg: TrainConfig) -> Path:
    """Everything that can be known before Ray starts: output folders writable, --resume
    fits, a re-run agrees with its Ray run, data readable and prepared; returns the shards."""
    for flag, folder in output_dirs(cfg):
        check_writable_dir(folder, flag)
    check_resume_file(cfg)
    check_rerun(cfg)
    shards = resolve_shards(cfg)
    if not cfg.output.no_judge:  # trained once per dataset, before Ray; the worker loads them
        from controlnet_ray.judging import ensure_judges

        ensure_judges(shards, cfg.data.resolved_cache_dir())
    return shards


def materialise_outputs(cfg: TrainConfig) -> list[Path]:
    """Copy what the run left in its storage into --save_dir / --log_dir where the driver
    runs (hard links when the storage is a local folder); returns the files that changed."""
    from controlnet_ray.storage import LOG_DIR, SAVE_DIR, RunStorage

    storage = RunStorage.open(cfg.storage_path(), cfg.run_name())
    changed = storage.materialise(storage.path(SAVE_DIR), Path(cfg.output.save_dir))
    return changed + storage.materialise(storage.path(LOG_DIR), Path(cfg.output.log_dir))


class OutputMirror:
    """While a run trains, keeps --save_dir / --log_dir following its storage (TensorBoard
    pointed at --log_dir sees each epoch, wherever rank 0 runs); on exit, one last copy."""

    def __init__(self, cfg: TrainConfig, interval_s: float = MIRROR_INTERVAL_S) -> None:
        self.cfg, self.interval_s = cfg, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="output-mirror", daemon=True)

    def __enter__(self) -> OutputMirror:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            materialise_outputs(self.cfg)
        except OSError as exc:
            if exc_type is None:  # a failed run's own error says more than this one
                raise
            print(f"could not copy the run's outputs down: {exc}", flush=True)

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                materialise_outputs(self.cfg)
            except OSError as exc:  # a storage hiccup must not stop training; the end retries
                print(f"outputs not copied down this time: {exc}", flush=True)


def fit_with_outputs(cfg: TrainConfig, trainer: Any) -> Any:
    """``trainer.fit()`` with the run's outputs copied down to the driver as they appear."""
    with OutputMirror(cfg):
        return trainer.fit()


def cluster_is_multi_node() -> bool:
    """More than one live node, or a driver's node that hosts no worker (a head with 0 CPUs,
    as the shipped manifests start it): then rank 0 runs elsewhere and local paths differ."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    mine = [n for n in nodes if n.get("NodeID") == here]
    return len(nodes) > 1 or any(n.get("Resources", {}).get("CPU", 0) == 0 for n in mine)


def _path_exists(path: str) -> bool:
    return os.path.exists(path)


def nodes_missing(folder: str) -> list[str]:
    """Addresses of live nodes that do not see ``folder`` as the driver does: a marker
    written here is looked for there (a zero-CPU task pinned to each node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = Path(folder) / f".controlnet_ray_probe_{uuid.uuid4().hex}"
    marker.write_bytes(b"")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(num_cpus=0)(_path_exists)
        refs = [
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        ]
        seen = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    finally:
        marker.unlink(missing_ok=True)
    return [
        n.get("NodeManagerAddress", n["NodeID"])
        for n, ok in zip(nodes, seen, strict=True)
        if not ok
    ]


SHARED_HINT = "use s3://..., gs://... or a folder every node mounts (NFS)"


def check_cluster_paths(cfg: TrainConfig, given_storage_path: str | None) -> None:
    """On a multi-node cluster, refuse before training the paths other nodes cannot see:
    Ray's checkpoint upload would otherwise fail on rank 0's node after a whole epoch, and the
    cache (shards, judge) would be read from a disk only the driver has.

    ``given_storage_path``: --storage_path as typed (None: the default under --save_dir)."""
    if not cluster_is_multi_node():
        return
    storage = cfg.storage_path()
    if given_storage_path is None:
        raise ConfigError(
            f"this Ray cluster has several nodes: pass --storage_path (the default, {storage}, "
            f"is a folder on the driver's disk, which rank 0's node does not have); {SHARED_HINT}"
        )
    if "://" not in given_storage_path and not Path(given_storage_path).expanduser().is_absolute():
        raise ConfigError(
            f"--storage_path {given_storage_path} is relative to the driver's working folder, "
            f"which other nodes do not have; {SHARED_HINT}"
        )
    folders = [("--cache_dir", str(cfg.data.resolved_cache_dir()))]
    if "://" not in storage:
        folders.insert(0, ("--storage_path", storage))
    for flag, folder in folders:
        missing = nodes_missing(folder)
        if missing:
            raise ConfigError(
                f"{flag} {folder} is not shared: node(s) {', '.join(missing)} do not see it; "
                f"{SHARED_HINT}"
                + (" (or set CONTROLNET_RAY_CACHE)" if flag == "--cache_dir" else "")
            )


def run_training(cfg: TrainConfig) -> object:
    """Check inputs and prepare data, then start Ray and train; returns Ray's Result."""
    t0 = time.time()
    given_storage_path = cfg.ray.storage_path
    cfg = absolute_paths(cfg)
    shards = check_before_ray(cfg)
    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if cfg.ray.fresh:
        discard_previous_run(cfg)
    elif (previous := existing_run(cfg)) is not None:
        print(
            f"found Ray run {cfg.run_name()} at {previous}: resuming from its latest "
            "checkpoint if any (--fresh starts over)",
            flush=True,
        )
    plan = plan_resources(cfg, float(os.cpu_count() or 1), local=True) if local else None
    started_ray = init_ray(cfg, plan.ray_num_cpus if plan else None)
    if plan is None:
        import ray

        plan = plan_resources(cfg, ray.cluster_resources().get("CPU", 0), local=False)
    check_cluster_paths(cfg, given_storage_path)
    need = resource_need(cfg, plan)
    with capacity.held(need, cfg.ray.resource_wait_s, fixed=local):
        result = _fit(cfg, plan, shards)
    print_judged_summary(getattr(result, "metrics", None) or {})
    if (run_dir := existing_run(cfg)) is not None:
        prune_unregistered_checkpoints(run_dir)
    if started_ray:
        shutdown_local_ray()
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return result


def _fit(cfg: TrainConfig, plan: ResourcePlan, shards: Path) -> object:
    """Build the pairs and the trainer, and train, with the console drawing the progress."""
    from controlnet_ray.progress import start_console

    print(
        f"resources: {plan.describe(cfg)}; effective batch size "
        f"{cfg.data.batch_size} x {cfg.ray.num_ray_workers} worker(s) x "
        f"{cfg.optim.gradient_accumulation_steps} accumulation = {cfg.effective_batch_size()}",
        flush=True,
    )
    pairs = build_pairs(cfg, shards)
    board, console = start_console(cfg.output.progress)
    try:
        return fit_with_outputs(cfg, build_trainer(cfg, plan, pairs, progress_board=board))
    finally:
        console.close()


def print_judged_summary(metrics: dict) -> None:
    """The run's last held-out judged figures, so a user can tell whether training worked."""
    from controlnet_ray.progress import format_judged

    if "judged_yaw_err_deg" in metrics:
        print(f"held-out (independent judges): {format_judged(metrics)}", flush=True)


def shutdown_local_ray() -> None:
    """Stop the local Ray this run started and delete its session folder (logs, sockets;
    ~2 MB a run, never pruned by Ray). Only after a successful run: a failed one keeps its
    logs for diagnosis."""
    import ray

    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
    except AttributeError:  # Ray's private layout changed: leave the folder alone
        session = None
    ray.shutdown()
    if session is not None and session.name.startswith("session_"):
        shutil.rmtree(session, ignore_errors=True)
