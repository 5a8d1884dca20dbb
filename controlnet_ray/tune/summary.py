"""The ranked table at the end of a sweep, and ``sweep_results.json`` / ``.csv``.

Why not only ``ResultGrid.get_dataframe()``: a trial resumed by ``Tuner.restore`` restarts
Tune's result files, so Tune (and its dataframe) holds only the epochs run after the resume.
Each trial's history is therefore Tune's rows (a pandas frame, ``Result.metrics_dataframe``)
merged with its Ray Train run's kept checkpoints and its ``training_history.json``
(:func:`merge_history`); the best epoch by ``--best_metric`` is picked from that merged history.

A trial's checkpoint is taken from its Ray Train run alone (``Result.from_path``), and only while
the folder exists: Tune's rows name a checkpoint for every epoch, including those Train has
since deleted (it keeps ``--num_to_keep``, ranked by the same ``--best_metric``)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlnet_ray.config import TrainConfig
from controlnet_ray.files import is_finite
from controlnet_ray.run_files import ScoreOrder
from controlnet_ray.storage import join_uri
from controlnet_ray.tune.search_space import TIME_ATTR, SweepOptions, sweep_metric
from controlnet_ray.tune.trials import trial_config

RESULTS_STEM = "sweep_results"


@dataclass
class TrialSummary:
    """One row of the ranked table."""

    trial_id: str
    loss_type: str
    pose_loss_weight: float
    lr: float
    seed: int
    best_score: float | None  # the best --best_metric value (sweep_results.json's "metric")
    best_epoch: int | None
    epochs_run: int
    stopped_early: bool
    status: str  # "finished", "stopped early", "error", "not run"
    checkpoint: str | None  # Train's kept checkpoint of the best epoch (state.pth inside)
    save_dir: str
    error: str | None = None


def summarize_trial(
    base: TrainConfig,
    sweep_name: str,
    trial_id: str,
    params: dict[str, Any],
    history: Iterable[dict[str, Any]],
    error: str | None,
    checkpoints: Mapping[int, str] | None = None,
) -> TrialSummary:
    """Best epoch by ``--best_metric`` and whether the scheduler cut the trial short.

    ``checkpoints``: epoch -> folder of the checkpoints the trial's Train run still keeps
    (:func:`kept_checkpoints`); the best epoch's is the row's, none when Train no longer keeps
    it. Paths in ``history`` are not used."""
    cfg = trial_config(base, params, sweep_name, trial_id)
    metric, mode = sweep_metric(cfg)
    rows = [r for r in history if is_finite(r.get(metric))]
    sign = 1.0 if mode == "max" else -1.0
    best = max(rows, key=lambda r: sign * float(r[metric]), default=None)  # first of ties
    epochs_run = max((int(r[TIME_ATTR]) for r in rows if is_finite(r.get(TIME_ATTR))), default=0)
    stopped = error is None and 0 < epochs_run < cfg.optim.epochs
    status = _status(error, bool(rows), stopped)
    return TrialSummary(
        trial_id=trial_id,
        loss_type=cfg.optim.loss_type,
        pose_loss_weight=cfg.optim.pose_loss_weight,
        lr=cfg.optim.lr,
        seed=cfg.ray.seed,
        best_score=float(best[metric]) if best else None,
        best_epoch=int(best[TIME_ATTR]) if best else None,
        epochs_run=epochs_run,
        stopped_early=stopped,
        status=status,
        checkpoint=(checkpoints or {}).get(int(best[TIME_ATTR])) if best else None,
        save_dir=cfg.output.save_dir,
        error=error,
    )


def _status(error: str | None, has_results: bool, stopped: bool) -> str:
    if error:
        return "error"
    if not has_results:
        return "not run"
    return "stopped early" if stopped else "finished"


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def rank(rows: Iterable[TrialSummary], mode: ScoreOrder) -> list[TrialSummary]:
    """Best score first (``mode``: the metric's direction); trials without a result last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r.best_score is None, sign * (r.best_score or 0.0)))


def format_table(rows: Sequence[TrialSummary], metric: str) -> str:
    """The ranked table printed at the end of the sweep (``metric``: the one it is ranked by)."""
    head = ["#", "trial", "loss_type", "pose_w", "lr", f"best {metric}", "epochs"]
    head.append("stopped early?")
    lines = [[*head, "checkpoint"]]
    for i, r in enumerate(rows, 1):
        psnr = f"{r.best_score:.4g}" if r.best_score is not None else "-"
        early = "yes" if r.stopped_early else ("error" if r.error else "no")
        ckpt = r.checkpoint or "-"
        lines.append(
            [str(i), r.trial_id, r.loss_type, f"{r.pose_loss_weight:g}", f"{r.lr:g}", psnr,
             str(r.epochs_run), early, ckpt]
        )  # fmt: skip
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    out = io.StringIO()
    for line in lines:
        cells = [cell.ljust(w) for cell, w in zip(line, widths, strict=False)]
        out.write("  ".join([*cells, line[-1]]).rstrip() + "\n")
    return out.getvalue()


def write_results(
    rows: Sequence[TrialSummary], base: TrainConfig, opts: SweepOptions, out_dir: Path
) -> tuple[Path, Path]:
    """``sweep_results.json`` (table + best config) and ``sweep_results.csv`` (table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [dataclasses.asdict(r) for r in rows]
    best = next((r for r in rows if r.best_score is not None), None)
    metric, mode = sweep_metric(base)
    payload = {
        "sweep_name": opts.sweep_name,
        "metric": metric,
        "mode": mode,
        "scheduler": opts.scheduler,
        "max_epochs": base.optim.epochs,
        "trials": records,
        "best": dataclasses.asdict(best) if best else None,
        "best_config": best_flags(best) if best else None,
    }
    json_path = out_dir / f"{RESULTS_STEM}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    csv_path = out_dir / f"{RESULTS_STEM}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(TrialSummary)])
        writer.writeheader()
        writer.writerows(records)
    return json_path, csv_path


def best_flags(best: TrialSummary) -> dict[str, Any]:
    """The winning values as training flags (``python -m controlnet_ray.train --k v``)."""
    return {
        "loss_type": best.loss_type,
        "pose_loss_weight": best.pose_loss_weight,
        "lr": best.lr,
        "seed": best.seed,
    }


def result_trial_id(result: Any) -> str:
    """The trial id a trial ran under (its Train run name and save dir), from its results.

    Not the folder name: Tune appends a random suffix to a trial's folder when the folder
    already exists, which happens when a sweep is stopped just as a trial was being set up and
    is then restored. The folder name is the fallback for a trial that never reported.
    """
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name)


def summaries_from_grid(grid: Any, base: TrainConfig, opts: SweepOptions) -> list[TrialSummary]:
    """Adapt Tune's ResultGrid to table rows, with each trial's full history; each trial's
    files are copied down from its storage first (a trial the scheduler stopped was ended
    before its own driver could)."""
    from controlnet_ray.launcher import materialise_outputs

    rows = []
    for result in grid:
        trial_id = result_trial_id(result)
        cfg = trial_config(base, result.config, opts.sweep_name, trial_id)
        try:
            materialise_outputs(cfg)
        except OSError as exc:  # storage unreachable: the table is still worth printing
            print(f"trial {trial_id}: outputs not copied down ({exc})", flush=True)
        df = result.metrics_dataframe
        tune_rows = df.to_dict("records") if df is not None else []
        train_rows = train_run_rows(cfg)
        history = merge_history(tune_rows, train_rows, history_file_rows(cfg))
        error = f"{type(result.error).__name__}: {result.error}" if result.error else None
        kept = kept_checkpoints(train_rows)
        rows.append(
            summarize_trial(base, opts.sweep_name, trial_id, result.config, history, error, kept)
        )
    return rows


def merge_history(*sources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch; earlier sources win, later ones fill the keys they lack.

    Needed because a trial resumed by ``Tuner.restore`` restarts Tune's result files: Tune
    then holds only the epochs run after the resume, while the Ray Train run and the trial's
    ``training_history.json`` hold them all.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    for source in sources:
        for row in source:
            if not is_finite(row.get(TIME_ATTR)):
                continue
            merged = by_epoch.setdefault(int(row[TIME_ATTR]), {})
            for key, value in row.items():
                if not _missing(value):  # pandas fills a column a row lacks with NaN
                    merged.setdefault(key, value)
    return [by_epoch[e] for e in sorted(by_epoch)]


def train_run_rows(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The kept checkpoints of the trial's Ray Train run, with their metrics, and their paths
    (``checkpoint_path``) where the folder still exists."""
    import logging

    from ray.train import Result

    run_path = join_uri(cfg.storage_path(), cfg.run_name())
    logger = logging.getLogger("ray.train")
    level = logger.level
    logger.setLevel(logging.ERROR)  # from_path logs a long note about resuming runs
    try:
        result = Result.from_path(run_path)
    except Exception:  # never started, or storage unreachable: the other sources remain
        return []
    finally:
        logger.setLevel(level)
    return [
        {**m, **({"checkpoint_path": c.path} if checkpoint_exists(c) else {})}
        for c, m in result.best_checkpoints or []
    ]


def checkpoint_exists(checkpoint: Any) -> bool:
    """Whether a ``ray.train.Checkpoint``'s folder exists on its own filesystem (False when
    the storage cannot be reached)."""
    from pyarrow.fs import FileType

    try:
        return checkpoint.filesystem.get_file_info(checkpoint.path).type == FileType.Directory
    except OSError:
        return False


def kept_checkpoints(train_rows: Iterable[dict[str, Any]]) -> dict[int, str]:
    """Epoch -> checkpoint folder, from :func:`train_run_rows` (Train's own record only)."""
    return {
        int(r[TIME_ATTR]): str(r["checkpoint_path"])
        for r in train_rows
        if r.get("checkpoint_path") and is_finite(r.get(TIME_ATTR))
    }


def history_file_rows(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Validation history from the trial's ``training_history.json`` (all epochs)."""
    from controlnet_ray import run_files

    path = run_files.in_dir(cfg.output.save_dir, run_files.HISTORY)
    try:
        val = json.loads(path.read_text()).get("val", [])
    except (OSError, ValueError):
        return []
    # Each entry is ``{"epoch": N, "loss": ..., "psnr": ..., "psnr_face": ...}``: the reported
    # metrics without their ``val_`` prefix (run_files.improves reads them the same way).
    return [
        {TIME_ATTR: v.get("epoch"), **{f"val_{k}": x for k, x in v.items() if k != "epoch"}}
        for v in val
        if isinstance(v, dict)
    ]
