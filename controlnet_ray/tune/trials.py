"""The trials: each one's config (own dirs, stable Ray Train run name), the trial function
that builds and fits its TorchTrainer, and the Tuner that runs (or restores) the sweep."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from controlnet_ray.config import ConfigError, TrainConfig
from controlnet_ray.storage import join_uri
from controlnet_ray.tune.asha import asha_state_file, make_scheduler
from controlnet_ray.tune.resources import SweepPlan
from controlnet_ray.tune.search_space import METRIC, MODE, SweepOptions, param_space

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


def run_trial(
    params: dict[str, Any], *, base: dict, pairs: Any, plan: dict, sweep_name: str
) -> None:
    """Tune trial function: build this trial's TorchTrainer and fit it (Train v2 pattern)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from controlnet_ray.launcher import ResourcePlan, build_trainer, fit_with_outputs

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(TrainConfig.from_dict(base), params, sweep_name, trial_id)
    print(
        f"trial {trial_id}: loss_type={cfg.optim.loss_type} pose_loss_weight="
        f"{cfg.optim.pose_loss_weight:g} lr={cfg.optim.lr:g} seed={cfg.ray.seed} -> "
        f"{cfg.output.save_dir}",
        flush=True,
    )
    resources = ResourcePlan(
        ray_num_cpus=None,
        cpus_per_worker=plan["cpus_per_worker"],
        torch_threads=plan["torch_threads"],
    )
    fit_with_outputs(cfg, build_trainer(cfg, resources, pairs, callbacks=[TuneReportCallback()]))


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
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(opts),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
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
