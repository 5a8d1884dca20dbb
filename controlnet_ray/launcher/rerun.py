"""A re-run of the same ``--save_dir`` and its Ray run on disk: found and continued (only when the
flags agree with its latest checkpoint), discarded with ``--fresh``, and cleared of checkpoint
folders Ray never registered once a run has finished. Ray's own snapshot says which checkpoint
it resumes from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from controlnet_ray import run_files
from controlnet_ray.config import ConfigError, TrainConfig


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
    ``--num_to_keep 2`` they pile up. Only folders absent from Ray's own record go.

    Called only after a run of this folder has finished, never before Ray starts: the Ray
    actors of a driver killed a moment ago can still be uploading a checkpoint and registering
    it, and a folder deleted under them leaves a record Ray refuses to resume from."""
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
