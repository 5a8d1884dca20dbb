"""The trials: each one's config (own dirs, stable Ray Train run name), the trial function
that builds and fits its TorchTrainer, and the Tuner that runs (or restores) the sweep. A sweep
is its name and its settings: run again with other settings, it is a new sweep and the old one
is set aside (:func:`set_aside_other_sweep`)."""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from pathlib import Path
from typing import Any

from controlnet_ray.config import ConfigError, TrainConfig
from controlnet_ray.files import dumps_strict, unused_path
from controlnet_ray.storage import RunStorage, join_uri
from controlnet_ray.tune.asha import asha_state_file, make_scheduler
from controlnet_ray.tune.resources import SweepPlan
from controlnet_ray.tune.search_space import SweepOptions, param_space, sweep_metric

TRAIN_RUNS_DIR = "train_runs"  # Ray Train runs of the trials, under <storage>/<sweep>/


def sweep_dir(storage_path: str, sweep_name: str) -> str:
    """The Tune experiment folder; s3:// and gs:// URIs (and their query) kept intact."""
    return join_uri(storage_path, sweep_name)


def trial_config(
    base: TrainConfig, params: dict[str, Any], sweep_name: str, trial_id: str
) -> TrainConfig:
    """One trial's config: the swept values, its own dirs and a stable Ray Train run name.

    The run name is the Tune trial id, which ``Tuner.restore`` keeps, so a restored trial
    finds its Ray Train run (``<storage>/<sweep>/train_runs/<trial_id>``) and continues it.
    """
    optim = dataclasses.replace(
        base.optim,
        loss_type=params["loss_type"],
        pose_loss_weight=float(params["pose_loss_weight"]),
        lr=float(params.get("lr", base.optim.lr)),
    )
    output = dataclasses.replace(
        base.output,
        save_dir=str(Path(base.output.save_dir) / sweep_name / trial_id),
        log_dir=str(Path(base.output.log_dir) / sweep_name / trial_id),
    )
    ray_opts = dataclasses.replace(
        base.ray,
        run_name=trial_id,
        storage_path=join_uri(base.storage_path(), sweep_name, TRAIN_RUNS_DIR),
        seed=base.ray.seed + int(params.get("repeat", 0)),
        fresh=False,
    )
    return dataclasses.replace(base, optim=optim, output=output, ray=ray_opts)


def trial_data_seed(cfg: TrainConfig, params: dict[str, Any]) -> int:
    """The seed of a trial's data order: from its seed (``--seed`` + repeat) and its swept
    values, so no two trials of a sweep see the same order of pairs (the datasets are built
    once, on the driver) and a restored trial draws its orders from the same seed."""
    text = json.dumps({"seed": cfg.ray.seed, **params}, sort_keys=True, default=str)
    return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF


def run_trial(
    params: dict[str, Any], *, base: dict, pairs: Any, plan: dict, sweep_name: str
) -> None:
    """Tune trial function: build this trial's TorchTrainer and fit it (Train v2 pattern)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from controlnet_ray.launcher import ResourcePlan, build_trainer, fit_with_outputs

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(TrainConfig.from_dict(base), params, sweep_name, trial_id)
    data_seed = trial_data_seed(cfg, params)
    print(
        f"trial {trial_id}: loss_type={cfg.optim.loss_type} pose_loss_weight="
        f"{cfg.optim.pose_loss_weight:g} lr={cfg.optim.lr:g} seed={cfg.ray.seed} "
        f"data order seed={data_seed} -> {cfg.output.save_dir}",
        flush=True,
    )
    resources = ResourcePlan(
        ray_num_cpus=None,
        cpus_per_worker=plan["cpus_per_worker"],
        torch_threads=plan["torch_threads"],
    )
    trainer = build_trainer(
        cfg, resources, pairs.reseeded(data_seed), callbacks=[TuneReportCallback()]
    )
    fit_with_outputs(cfg, trainer)


def _trial_id(trial: Any) -> str:
    return trial.trial_id


def make_tuner(cfg: TrainConfig, opts: SweepOptions, plan: SweepPlan, pairs: Any):
    """A new Tuner, or the interrupted sweep's when ``Tuner.can_restore`` finds it."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=cfg.to_dict(),
            pairs=pairs,
            plan=dataclasses.asdict(plan),
            sweep_name=opts.sweep_name,
        ),
        plan.trial_resources(),
    )
    path = sweep_dir(cfg.storage_path(), opts.sweep_name)
    if tune.Tuner.can_restore(path):
        print(
            f"resuming sweep {opts.sweep_name} from {path}: finished trials are kept, "
            "unfinished and errored ones continue from their last Ray Train checkpoint "
            "(the search-space flags of the first run apply)",
            flush=True,
        )
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    state_file = asha_state_file(cfg, opts)
    state_file.unlink(missing_ok=True)  # a new sweep starts with empty rungs
    scheduler = make_scheduler(opts, cfg.optim.epochs, state_file)
    metric, mode = sweep_metric(cfg)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(opts),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            scheduler=scheduler,
            max_concurrent_trials=plan.concurrency,
            trial_name_creator=_trial_id,
            trial_dirname_creator=_trial_id,
        ),
        run_config=tune.RunConfig(
            name=opts.sweep_name,
            storage_path=cfg.storage_path(),
            failure_config=sweep_failure_config(cfg),
            verbose=1,
        ),
    )
    return tuner


def sweep_failure_config(cfg: TrainConfig) -> Any:
    """Tune relaunches a failed trial up to --max_failures times, as Train restarts failed
    workers: a trial whose function died (its node lost) continues its Ray Train run from the
    last checkpoint, since the run name is the trial id. A training error that Train already
    retried is retried again by Tune, so such a trial fails only after both budgets."""
    from ray import tune

    return tune.FailureConfig(max_failures=cfg.ray.max_failures)


def discard_previous_sweep(cfg: TrainConfig, opts: SweepOptions) -> None:
    """--fresh: remove the sweep's Tune experiment and its trials' Train runs (local only)."""
    import shutil

    path = sweep_dir(cfg.storage_path(), opts.sweep_name)
    if "://" in path:
        raise ConfigError("--fresh only works with a local --storage_path; use a new --sweep_name")
    if Path(path).exists():
        print(f"--fresh: removing previous sweep at {path}", flush=True)
        shutil.rmtree(path)


SWEEP_RECORD = ".controlnet_sweep.json"  # in the Tune experiment folder: what the sweep is


def sweep_space(opts: SweepOptions) -> dict[str, Any]:
    """The search space as the sweep record keeps it (JSON values): everything of ``opts`` but
    the sweep's name and how many trials run at once."""
    space = dataclasses.asdict(opts)
    for placement in ("sweep_name", "max_concurrent_trials"):
        space.pop(placement)
    return json.loads(dumps_strict(space))


def set_aside_other_sweep(cfg: TrainConfig, opts: SweepOptions) -> Path | None:
    """A sweep run again with other settings is a new sweep: the old Tune experiment (with its
    trials' Train runs) and its results in ``--save_dir`` / ``--log_dir`` move to
    ``<sweep_name>.<time>`` beside them, with one line naming the differences; then the
    experiment folder records this sweep. On object storage an experiment cannot be moved:
    a new ``--sweep_name`` is asked for. Returns where the experiment moved (None: nothing)."""
    storage = RunStorage.open(cfg.storage_path(), opts.sweep_name)
    record_path = storage.path(SWEEP_RECORD)
    mine = {"config": cfg.to_dict(), "space": sweep_space(opts)}
    old = _read_record(storage, record_path)
    changes = _sweep_changes(old, mine["space"], cfg)
    if not changes or not storage.exists(storage.root):
        storage.put_bytes(dumps_strict(mine).encode(), record_path)
        return None
    differ = ", ".join(changes)
    if not storage.is_local:
        raise ConfigError(
            f"--sweep_name {opts.sweep_name} on {cfg.storage_path()} holds a sweep with other "
            f"settings ({differ}); pass a new --sweep_name"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved: list[tuple[Path, Path]] = []
    for base in (Path(storage.root).parent, Path(cfg.output.save_dir), Path(cfg.output.log_dir)):
        src = base / opts.sweep_name
        if src.exists():
            moved.append((src, unused_path(base / f"{opts.sweep_name}.{stamp}")))
            src.rename(moved[-1][1])
    where = "; ".join(f"{src} to {dest}" for src, dest in moved)
    print(f"a new sweep (other settings: {differ}): moved {where}", flush=True)
    storage.put_bytes(dumps_strict(mine).encode(), record_path)
    return moved[0][1]


def _read_record(storage: RunStorage, path: str) -> dict[str, Any]:
    if not storage.exists(path):
        return {}
    with storage.fs.open_input_stream(path) as f:
        try:
            doc = json.loads(f.read())
        except ValueError:
            return {}
    return doc if isinstance(doc, dict) else {}


def _sweep_changes(old: dict[str, Any], space: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Why the recorded sweep ``old`` is another sweep: its trials' defining settings
    (:func:`~controlnet_ray.checkpoint.setting_changes`) and its search space ([] when the same
    sweep)."""
    from controlnet_ray.checkpoint import format_setting, setting_changes

    if not old.get("config"):
        return ["no record of the settings it ran with"]
    old_space = old.get("space") or {}
    return setting_changes(old["config"], cfg) + [
        f"--{key} {format_setting(old_space.get(key))} -> {format_setting(value)}"
        for key, value in space.items()
        if old_space.get(key) != value
    ]
