"""``python -m controlnet_ray.tune``: a Ray Tune sweep over loss type, pose-loss weight and lr.

Ray 2.60 runs Train v2, where a ``TorchTrainer`` can no longer be handed to ``Tuner``: each
trial is a small function that builds the run's ``TorchTrainer`` from the launcher's pieces
and forwards its reports to Tune through ``TuneReportCallback``.

Resources: Tune places each trial function in a placement group that *captures* the tasks
started beneath it, and Ray Data is inconsistent there (measured with Ray 2.60: its shuffle
tasks are captured and "cannot fit into any bundles" of a fractional-CPU trial, while its
file-listing tasks are not and wait for a CPU outside the group). So the pair datasets are
built once on the driver, outside any group, and handed to every trial; the only Ray Data work
left inside a trial is the per-epoch decode, whose small tasks Ray Data schedules outside the
group on the CPU kept free for it (without a free CPU Ray Data waits forever). The trial
function holds a fraction of a CPU (a trial with zero CPUs fails at start) and the trainer's
workers hold their own placement group, as in a plain training run.

Every trial gets a stable Ray Train run name (its Tune trial id) and its own save/log dirs, so
re-running the same command restores the sweep with ``Tuner.restore`` and each unfinished trial
continues from its last Ray Train checkpoint.

Modules: ``search_space`` (grid, scheduler options, the ranking metric), ``resources`` (trials at
once and their CPUs), ``trials`` (per-trial config, trial function, Tuner), ``asha`` (rungs that
survive a restore), ``summary`` (ranked table and result files), ``command_line`` (flags and
driver; ``__main__`` runs it). Importing the package does not import Ray.
"""

from controlnet_ray.tune.asha import load_rungs, make_scheduler, rung_lists, save_rungs
from controlnet_ray.tune.command_line import main, parse_sweep_args
from controlnet_ray.tune.resources import (
    DRIVER_RESOURCE,
    DRIVER_SHARE,
    TRIAL_CPUS,
    SweepPlan,
    plan_sweep,
    sweep_need,
)
from controlnet_ray.tune.search_space import SweepOptions, param_space
from controlnet_ray.tune.summary import (
    format_table,
    merge_history,
    rank,
    result_trial_id,
    summarize_trial,
    write_results,
)
from controlnet_ray.tune.trials import (
    _trial_id,
    discard_previous_sweep,
    run_trial,
    set_aside_other_sweep,
    sweep_dir,
    sweep_failure_config,
    trial_config,
)

# A sweep's tuner.pkl refers to run_trial, _trial_id, save_rungs and load_rungs by the name
# they had before this package was split (controlnet_ray.tune.<name>): kept here so that
# Tuner.restore resumes sweeps started by earlier versions.
__all__ = [
    "DRIVER_RESOURCE",
    "DRIVER_SHARE",
    "TRIAL_CPUS",
    "SweepOptions",
    "SweepPlan",
    "_trial_id",
    "discard_previous_sweep",
    "set_aside_other_sweep",
    "format_table",
    "load_rungs",
    "main",
    "make_scheduler",
    "merge_history",
    "param_space",
    "parse_sweep_args",
    "plan_sweep",
    "rank",
    "result_trial_id",
    "run_trial",
    "rung_lists",
    "save_rungs",
    "summarize_trial",
    "sweep_dir",
    "sweep_failure_config",
    "sweep_need",
    "trial_config",
    "write_results",
]
