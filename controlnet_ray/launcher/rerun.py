"""A command run again in a used ``--save_dir``. Its Ray run is named by the folder and the
settings that define the training (:meth:`TrainConfig.run_name`), so:

* the same command again (or a longer ``--epochs``) finds its Ray run and continues it (only
  when the flags agree with its latest checkpoint), or discards it with ``--fresh``;
* a command with other settings is a new run: before it writes, the files another run left in
  ``--save_dir`` and ``--log_dir`` move to a folder beside them (:func:`set_aside_other_runs`),
  and each folder records which run now writes there (``run_files.RUN_RECORD``).

Once a run has finished, checkpoint folders Ray never registered are removed. Ray's own
snapshot says which checkpoint it resumes from.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from controlnet_ray import run_files
from controlnet_ray.config import ConfigError, TrainConfig
from controlnet_ray.files import atomic_write_text, dumps_strict, unused_path


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
    registered = {r.get("checkpoint_dir_name") for r in results if isinstance(r, dict)} - {None}
    if not registered:  # no record (or one Ray no longer writes this way): delete nothing
        return []
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


# ------------------------------------------------------------------ another run's files set aside


def set_aside_other_runs(cfg: TrainConfig) -> list[Path]:
    """Before this run writes: the files another run (other settings, or unknown: the
    original script's) left in ``--save_dir`` / ``--log_dir`` move to ``<folder>.<time>``
    beside the folder, named by when that run last wrote; one line says what moved where and
    which settings differ. Only the run's own kinds of file move (a folder may hold a user's
    other files). Each folder then records this run. Returns the folders files moved to."""
    owned: dict[Path, list[Callable[[str], bool]]] = {}
    for folder, test in (
        (cfg.output.save_dir, run_files.is_save_dir_file),
        (cfg.output.log_dir, run_files.is_log_dir_file),
    ):
        if folder is not None and "://" not in folder:
            owned.setdefault(Path(folder), []).append(test)
    moved: list[Path] = []
    said: list[str] = []
    for folder, tests in owned.items():
        record = read_run_record(folder)
        leftovers = [] if record.get("run_name") == cfg.run_name() else _files_of(folder, tests)
        if leftovers:
            moved.append(_move_aside(folder, leftovers))
            said.append(
                f"{len(leftovers)} file(s) of the previous run ({_why_other(record, cfg)}) "
                f"from {folder} to {moved[-1]}"
            )
        _write_run_record(folder, cfg)
    if said:
        print(f"a new run (other settings): moved {'; '.join(said)}", flush=True)
    return moved


def read_run_record(folder: Path) -> dict:
    """The run record of ``folder`` ({} when there is none or it is unreadable: then the files
    there are of an unknown run and are set aside, never trusted)."""
    try:
        doc = json.loads((folder / run_files.RUN_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_run_record(folder: Path, cfg: TrainConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"run_name": cfg.run_name(), "config": cfg.to_dict()}
    atomic_write_text(folder / run_files.RUN_RECORD, dumps_strict(doc))


def _files_of(folder: Path, tests: list[Callable[[str], bool]]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and any(t(p.name) for t in tests))


def _move_aside(folder: Path, leftovers: list[Path]) -> Path:
    """Move ``leftovers`` into a new ``<folder>.<YYYYmmdd-HHMMSS>`` (their newest write),
    ``-2``, ``-3`` ... appended when that name is taken."""
    newest = max(p.stat().st_mtime for p in leftovers)
    stem = f"{folder.name}.{time.strftime('%Y%m%d-%H%M%S', time.localtime(newest))}"
    dest = unused_path(folder.with_name(stem))
    dest.mkdir(parents=True)
    for p in leftovers:
        p.rename(dest / p.name)
    return dest


def _why_other(record: dict, cfg: TrainConfig) -> str:
    """Which settings differ between the run that left the files and this one."""
    from controlnet_ray import checkpoint as ckpt

    if not record.get("config"):
        return "the files there carry no record of the settings that wrote them"
    differ = ckpt.setting_changes(record["config"], cfg)
    return ", ".join(differ) or f"Ray run {record.get('run_name')}"
