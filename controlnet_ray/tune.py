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
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlnet_ray import capacity
from controlnet_ray.capacity import DATA_CPUS, Need
from controlnet_ray.cli import build_parser, namespace_to_config, normalize_argv
from controlnet_ray.config import LOSS_TYPES, ConfigError, TrainConfig
from controlnet_ray.files import atomic_write_text, is_finite
from controlnet_ray.storage import join_uri

TRIAL_CPUS = 0.25  # the trial function only waits on its trainer; zero CPUs fails at start
# A custom resource the cluster configs declare on the head node (never preempted): when the
# cluster has it, every trial function (and so its Train controller, which Ray places on the
# trial's node) asks for a sliver of it and no CPU, so trials never land on preemptible GPU
# workers. A cluster without it (a local Ray) places trials by CPU as before.
DRIVER_RESOURCE = "driver_node"
DRIVER_SHARE = 0.001
METRIC, MODE, TIME_ATTR = "val_psnr", "max", "epoch"
TRAIN_RUNS_DIR = "train_runs"  # Ray Train runs of the trials, under <storage>/<sweep>/
RESULTS_STEM = "sweep_results"
SCHEDULERS = ("asha", "none")


@dataclass
class SweepOptions:
    """The search space and how the sweep is run (everything that is not a training flag)."""

    sweep_name: str = "controlnet_sweep"
    loss_types: tuple[str, ...] = LOSS_TYPES
    pose_loss_weights: tuple[float, ...] = (0.01, 0.1, 0.5)
    lrs: tuple[float, ...] | None = None  # None: the training flag --lr for every trial
    num_samples: int = 1  # repeats of every grid point, seeds --seed + 0..num_samples-1
    max_concurrent_trials: int | None = None  # None: as many as the CPUs/GPUs allow
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0

    def grid_size(self) -> int:
        lrs = len(self.lrs) if self.lrs else 1
        return len(self.loss_types) * len(self.pose_loss_weights) * lrs * self.num_samples


# --------------------------------------------------------------------------- command line


def build_sweep_parser() -> argparse.ArgumentParser:
    """The training parser plus a "sweep" group, so every training flag works unchanged."""
    p = build_parser(prog="python -m controlnet_ray.tune")
    p.description = (
        "Ray Tune sweep of ImageControlNet training runs (ASHA on val PSNR by default). "
        "Takes every training flag of python -m controlnet_ray.train; --epochs is the "
        "longest a trial may run. Re-running the same command resumes the sweep."
    )
    d = SweepOptions()
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep_name", default=d.sweep_name, help="Tune experiment name")
    g.add_argument(
        "--loss_types", nargs="+", default=list(d.loss_types), metavar="LOSS",
        help=f"values of --loss_type to try, from {{{','.join(LOSS_TYPES)}}}",
    )  # fmt: skip
    g.add_argument(
        "--pose_loss_weights", nargs="+", type=float, default=list(d.pose_loss_weights),
        metavar="W", help="values of --pose_loss_weight to try",
    )  # fmt: skip
    g.add_argument(
        "--lrs", nargs="+", type=float, default=None, metavar="LR",
        help="values of --lr to try (default: --lr only)",
    )  # fmt: skip
    g.add_argument(
        "--num_samples", type=int, default=d.num_samples,
        help="repeats of every grid point, with seeds --seed + 0..N-1",
    )  # fmt: skip
    g.add_argument(
        "--max_concurrent_trials", type=int, default=None,
        help="trials running at once (default: as many as the CPUs/GPUs hold; 1 on 2 cores)",
    )  # fmt: skip
    g.add_argument("--scheduler", default=d.scheduler, help=f"one of {{{','.join(SCHEDULERS)}}}")
    g.add_argument(
        "--grace_period", type=int, default=d.grace_period,
        help="ASHA: epochs every trial runs before it may be stopped",
    )  # fmt: skip
    g.add_argument(
        "--reduction_factor", type=float, default=d.reduction_factor,
        help="ASHA: keep the best 1/factor of the trials at every rung",
    )  # fmt: skip
    return p


def parse_sweep_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, SweepOptions]:
    """Parse and validate; exits with status 2 and a message naming the flag on bad input."""
    parser = build_sweep_parser()
    ns = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else argv, parser))
    opts = SweepOptions(
        sweep_name=ns.sweep_name,
        loss_types=tuple(ns.loss_types),
        pose_loss_weights=tuple(ns.pose_loss_weights),
        lrs=tuple(ns.lrs) if ns.lrs else None,
        num_samples=ns.num_samples,
        max_concurrent_trials=ns.max_concurrent_trials,
        scheduler=ns.scheduler,
        grace_period=ns.grace_period,
        reduction_factor=ns.reduction_factor,
    )
    try:
        cfg = namespace_to_config(ns).validate()
        validate_sweep(cfg, opts)
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg, opts


def validate_sweep(cfg: TrainConfig, opts: SweepOptions) -> None:
    """Check every swept value through TrainConfig's own validation, naming the sweep flag."""
    name = opts.sweep_name
    if not name or any(not (c.isalnum() or c in "-_.") for c in name):
        raise ConfigError(f"--sweep_name must be letters, digits, '-', '_' or '.', got {name!r}")
    for flag, values, field in (
        ("--loss_types", opts.loss_types, "loss_type"),
        ("--pose_loss_weights", opts.pose_loss_weights, "pose_loss_weight"),
        ("--lrs", opts.lrs or (), "lr"),
    ):
        if len(set(values)) != len(values):
            raise ConfigError(f"{flag} has duplicates: {list(values)}")
        for v in values:
            try:  # replace() checks the section's values, validate() the rest
                optim = dataclasses.replace(cfg.optim, **{field: v})
                dataclasses.replace(cfg, optim=optim).validate()
            except ConfigError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
    if opts.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1, got {opts.num_samples}")
    if opts.max_concurrent_trials is not None and opts.max_concurrent_trials < 1:
        raise ConfigError(f"--max_concurrent_trials must be >= 1, got {opts.max_concurrent_trials}")
    if opts.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {{asha,none}}, got {opts.scheduler!r}")
    if not 1 <= opts.grace_period <= cfg.optim.epochs:
        raise ConfigError(
            f"--grace_period must be in 1..--epochs ({cfg.optim.epochs}), got {opts.grace_period}"
        )
    if not opts.reduction_factor > 1:
        raise ConfigError(f"--reduction_factor must be > 1, got {opts.reduction_factor}")


# --------------------------------------------------------------------------- resources


@dataclass
class SweepPlan:
    """CPUs of one trial (function + trainer workers), trials at once, and Ray's CPU count."""

    concurrency: int
    trial_cpus: float
    cpus_per_worker: float
    torch_threads: int
    ray_num_cpus: int | None  # a local Ray's logical CPUs; None: use the cluster as is
    on_driver_nodes: bool = False  # trials on DRIVER_RESOURCE nodes, without a CPU

    def trial_resources(self) -> dict[str, float]:
        """What one trial function asks Ray for (its trainer's workers ask for their own)."""
        if self.on_driver_nodes:
            return {"CPU": 0.0, DRIVER_RESOURCE: DRIVER_SHARE}
        return {"CPU": self.trial_cpus}

    def describe(self, cfg: TrainConfig) -> str:
        n = cfg.ray.num_ray_workers
        gpu = " + 1 GPU" if cfg.ray.use_gpu else ""
        return (
            f"{self.concurrency} trial(s) at once, each {self.trial_text()} + "
            f"{n} worker(s) x {self.cpus_per_worker:g} CPU{gpu}; {DATA_CPUS:g} CPU kept for Ray "
            f"Data; {self.torch_threads} torch thread(s) per worker"
        )

    def trial_text(self) -> str:
        if self.on_driver_nodes:
            return f"trial on a {DRIVER_RESOURCE} node"
        return f"{self.trial_cpus:g} CPU (trial)"


def default_concurrency(cfg: TrainConfig, cpus: float, gpus: float) -> int:
    """Trials that fit with one whole CPU per worker (a GPU each with --use_gpu); at least 1."""
    n = cfg.ray.num_ray_workers
    per_trial = TRIAL_CPUS + n * (cfg.ray.cpus_per_worker or 1.0)
    fit = int((cpus - DATA_CPUS) // per_trial)
    if cfg.ray.use_gpu:
        fit = min(fit, int(gpus // n))
    return max(1, fit)


def plan_sweep(
    cfg: TrainConfig,
    opts: SweepOptions,
    cpus: float,
    gpus: float,
    local: bool,
    on_driver_nodes: bool = False,
) -> SweepPlan:
    """Share ``cpus`` between concurrent trials so that Ray Data always keeps one CPU.

    Workers get what is left of a trial's share, between 0.25 and 1 CPU each. Locally a
    shortfall is covered by giving Ray more logical CPUs than cores (the launcher does the
    same); whether a cluster holds the plan is :func:`sweep_need`'s business.
    ``on_driver_nodes``: the cluster has DRIVER_RESOURCE, where trials run without a CPU.
    """
    n = cfg.ray.num_ray_workers
    trial_cpus = 0.0 if on_driver_nodes else TRIAL_CPUS
    concurrency = opts.max_concurrent_trials or default_concurrency(cfg, cpus, gpus)
    concurrency = min(concurrency, opts.grid_size())
    budget = (cpus - DATA_CPUS) / concurrency - trial_cpus  # one trial's workers
    cpw = cfg.ray.cpus_per_worker or min(1.0, max(0.25, budget / n))
    needed = concurrency * (trial_cpus + n * cpw) + DATA_CPUS
    threads = 2 if cfg.ray.use_gpu else max(1, int(budget // n))
    ray_cpus = max(int(cpus), math.ceil(needed - 1e-9)) if local else None
    return SweepPlan(concurrency, trial_cpus, cpw, threads, ray_cpus, on_driver_nodes)


def sweep_need(cfg: TrainConfig, plan: SweepPlan) -> Need:
    """What the sweep holds at once: each concurrent trial's function and workers, plus Ray
    Data's CPU."""
    n, cpw, gpu = cfg.ray.num_ray_workers, plan.cpus_per_worker, cfg.ray.use_gpu
    worker = {"CPU": cpw, "GPU": 1.0} if gpu else {"CPU": cpw}
    trial = [plan.trial_resources(), *[worker] * n]
    bundles = [b for _ in range(plan.concurrency) for b in trial] + [{"CPU": DATA_CPUS}]
    totals: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            totals[key] = totals.get(key, 0.0) + value
    return Need(
        totals={k: v for k, v in totals.items() if v > 0},
        bundles=tuple(b for b in bundles if any(v > 0 for v in b.values())),
        flags=(
            f"--max_concurrent_trials {plan.concurrency} x ({plan.trial_text()} + "
            f"--num_ray_workers {n} x (--cpus_per_worker {cpw:g}"
            f"{' + 1 GPU for --use_gpu' if gpu else ''})) + {DATA_CPUS:g} CPU for Ray Data"
        ),
        remedy="lower --max_concurrent_trials, --num_ray_workers or --cpus_per_worker",
    )


# --------------------------------------------------------------------------- the trials


def param_space(opts: SweepOptions) -> dict[str, Any]:
    """A full grid: every loss type x pose weight (x lr) x repeat is one trial."""
    from ray import tune

    space: dict[str, Any] = {
        "loss_type": tune.grid_search(list(opts.loss_types)),
        "pose_loss_weight": tune.grid_search(list(opts.pose_loss_weights)),
        "repeat": tune.grid_search(list(range(opts.num_samples))),
    }
    if opts.lrs:
        space["lr"] = tune.grid_search(list(opts.lrs))
    return space


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


def asha_state_file(cfg: TrainConfig, opts: SweepOptions) -> Path:
    """Where ASHA's rungs are mirrored: beside the sweep's results, always a local path."""
    return Path(cfg.output.save_dir) / opts.sweep_name / "asha_rungs.json"


def make_scheduler(opts: SweepOptions, max_t: int, state_file: Path) -> Any:
    """ASHA on the reported epoch (val PSNR, max), or None for ``--scheduler none``.

    Tune 2.60 saves the searcher's state with the experiment but not the scheduler's, so a
    plain ASHA restored by ``Tuner.restore`` starts with empty rungs and lets every later
    trial through. This subclass mirrors its rung records to ``state_file`` after each result
    and reads them back when ``Tuner.restore`` unpickles it. The class is built here, not at
    module level, so that importing this module does not import Ray (cloudpickle stores it
    by value in the Tuner's state).
    """
    if opts.scheduler != "asha":
        return None
    from ray.tune.schedulers import AsyncHyperBandScheduler

    class ResumableASHA(AsyncHyperBandScheduler):
        def __init__(self, rungs_file: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.rungs_file = rungs_file

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            save_rungs(getattr(self, "_brackets", None), self.rungs_file)
            return action

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            super().on_trial_complete(tune_controller, trial, result)
            save_rungs(getattr(self, "_brackets", None), self.rungs_file)

        def __setstate__(self, state: dict) -> None:
            self.__dict__.update(state)
            load_rungs(getattr(self, "_brackets", None), self.rungs_file)

    scheduler = ResumableASHA(
        str(state_file),
        time_attr=TIME_ATTR,
        max_t=max_t,
        grace_period=opts.grace_period,
        reduction_factor=opts.reduction_factor,
    )
    if rung_lists(getattr(scheduler, "_brackets", None)) is None:
        print(
            "warning: this Ray's ASHA keeps its rungs in an unknown layout; the sweep runs, "
            "but a resumed sweep starts ASHA with empty rungs",
            file=sys.stderr,
            flush=True,
        )
    return scheduler


def rung_lists(brackets: Any) -> list[list] | None:
    """ASHA's rung records, one list of ``(milestone, {trial_id: reward})`` per bracket, or
    None when this Ray's ASHA does not keep them that way.

    ``_brackets``/``_rungs`` are ASHA's private bookkeeping in the pinned Ray 2.60; a Ray with
    another layout must not break the sweep, only the rung mirror (see :func:`make_scheduler`).
    """
    try:
        rungs = [b._rungs for b in brackets]
    except (AttributeError, TypeError):
        return None
    for bracket in rungs:
        if not isinstance(bracket, list) or not all(
            isinstance(r, tuple | list) and len(r) == 2 and isinstance(r[1], dict) for r in bracket
        ):
            return None
    return rungs


def save_rungs(brackets: Any, path: str) -> bool:
    """Write each bracket's rungs as ``[[milestone, {trial_id: reward}], ...]`` atomically;
    False (nothing written) when :func:`rung_lists` does not know this Ray's layout."""
    rungs = rung_lists(brackets)
    if rungs is None:
        return False
    data = [[[m, dict(rec)] for m, rec in bracket] for bracket in rungs]
    atomic_write_text(path, json.dumps(data))
    return True


def load_rungs(brackets: Any, path: str) -> int:
    """Refill the rungs from :func:`save_rungs`' file; returns how many records came back.
    Milestones are checked before a file is trusted."""
    target = Path(path)
    rungs = rung_lists(brackets)
    if rungs is None or not target.is_file():
        return 0
    data = json.loads(target.read_text())
    restored = 0
    for bracket, saved in zip(rungs, data, strict=False):
        for (milestone, recorded), (saved_m, saved_rec) in zip(bracket, saved, strict=False):
            if float(milestone) == float(saved_m):
                recorded.update(saved_rec)
                restored += len(saved_rec)
    if restored:
        print(f"ASHA: restored {restored} rung record(s) from {target}", flush=True)
    return restored


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


# --------------------------------------------------------------------------- the summary


@dataclass
class TrialSummary:
    """One row of the ranked table."""

    trial_id: str
    loss_type: str
    pose_loss_weight: float
    lr: float
    seed: int
    best_val_psnr: float | None
    best_epoch: int | None
    epochs_run: int
    stopped_early: bool
    status: str  # "finished", "stopped early", "error", "not run"
    checkpoint: str | None  # Ray Train checkpoint dir of the best epoch (state.pth inside)
    save_dir: str
    error: str | None = None


def summarize_trial(
    base: TrainConfig,
    sweep_name: str,
    trial_id: str,
    params: dict[str, Any],
    history: Iterable[dict[str, Any]],
    error: str | None,
) -> TrialSummary:
    """Best epoch by val PSNR and whether the scheduler cut the trial short."""
    cfg = trial_config(base, params, sweep_name, trial_id)
    rows = [r for r in history if is_finite(r.get(METRIC))]
    best = max(rows, key=lambda r: float(r[METRIC]), default=None)
    epochs_run = max((int(r[TIME_ATTR]) for r in rows if is_finite(r.get(TIME_ATTR))), default=0)
    stopped = error is None and 0 < epochs_run < cfg.optim.epochs
    status = _status(error, bool(rows), stopped)
    return TrialSummary(
        trial_id=trial_id,
        loss_type=cfg.optim.loss_type,
        pose_loss_weight=cfg.optim.pose_loss_weight,
        lr=cfg.optim.lr,
        seed=cfg.ray.seed,
        best_val_psnr=float(best[METRIC]) if best else None,
        best_epoch=int(best[TIME_ATTR]) if best else None,
        epochs_run=epochs_run,
        stopped_early=stopped,
        status=status,
        checkpoint=(best.get("checkpoint_path") or None) if best else None,
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


def rank(rows: Iterable[TrialSummary]) -> list[TrialSummary]:
    """Best val PSNR first; trials without a result last."""
    return sorted(rows, key=lambda r: (r.best_val_psnr is None, -(r.best_val_psnr or 0.0)))


def format_table(rows: Sequence[TrialSummary]) -> str:
    """The ranked table printed at the end of the sweep."""
    head = ["#", "trial", "loss_type", "pose_w", "lr", "best PSNR", "epochs", "stopped early?"]
    lines = [[*head, "checkpoint"]]
    for i, r in enumerate(rows, 1):
        psnr = f"{r.best_val_psnr:.2f}" if r.best_val_psnr is not None else "-"
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
    best = next((r for r in rows if r.best_val_psnr is not None), None)
    payload = {
        "sweep_name": opts.sweep_name,
        "metric": METRIC,
        "mode": MODE,
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
        history = merge_history(tune_rows, train_run_rows(cfg), history_file_rows(cfg))
        error = f"{type(result.error).__name__}: {result.error}" if result.error else None
        rows.append(summarize_trial(base, opts.sweep_name, trial_id, result.config, history, error))
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
    """The kept checkpoints of the trial's Ray Train run, with their metrics and paths."""
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
    return [{**m, "checkpoint_path": c.path} for c, m in result.best_checkpoints or []]


def history_file_rows(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Validation history from the trial's ``training_history.json`` (all epochs)."""
    from controlnet_ray.reporting import history_path

    path = history_path(cfg.output.save_dir)
    try:
        val = json.loads(path.read_text()).get("val", [])
    except (OSError, ValueError):
        return []
    return [
        {TIME_ATTR: v.get("epoch"), METRIC: v.get("psnr"), "val_loss": v.get("loss")} for v in val
    ]


# --------------------------------------------------------------------------- driver


def discard_previous_sweep(cfg: TrainConfig, opts: SweepOptions) -> None:
    """--fresh: remove the sweep's Tune experiment and its trials' Train runs (local only)."""
    import shutil

    path = sweep_dir(cfg.storage_path(), opts.sweep_name)
    if "://" in path:
        raise ConfigError("--fresh only works with a local --storage_path; use a new --sweep_name")
    if Path(path).exists():
        print(f"--fresh: removing previous sweep at {path}", flush=True)
        shutil.rmtree(path)


def start_ray(cfg: TrainConfig, opts: SweepOptions) -> tuple[SweepPlan, bool]:
    """Connect (or start a local Ray sized for the sweep) and plan the trials' resources;
    also returns whether the cluster is local (fixed: a shortfall fails at once)."""
    import ray

    from controlnet_ray.launcher import init_ray

    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if local:
        plan = plan_sweep(cfg, opts, float(os.cpu_count() or 1), 0.0, local=True)
        init_ray(cfg, plan.ray_num_cpus)
    else:
        init_ray(cfg, None)
    res = ray.cluster_resources()
    on_driver = res.get(DRIVER_RESOURCE, 0.0) > 0
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    return plan_sweep(cfg, opts, cpus, gpus, local=local, on_driver_nodes=on_driver), local


def run_sweep(cfg: TrainConfig, opts: SweepOptions) -> list[TrialSummary]:
    """Prepare shards once, run (or resume) the sweep, print and write the ranked table."""
    from controlnet_ray.launcher import absolute_paths, build_pairs, resolve_shards

    t0 = time.time()
    cfg = absolute_paths(cfg)
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, run_name=None))
    if cfg.ray.fresh:
        discard_previous_sweep(cfg, opts)
    plan, local = start_ray(cfg, opts)
    print(f"sweep {opts.sweep_name}: {opts.grid_size()} trial(s); {plan.describe(cfg)}", flush=True)
    with capacity.held(sweep_need(cfg, plan), cfg.ray.resource_wait_s, fixed=local):
        shards = resolve_shards(cfg)
        pairs = build_pairs(cfg, shards)
        grid = make_tuner(cfg, opts, plan, pairs).fit()
    rows = rank(summaries_from_grid(grid, cfg, opts))
    out_dir = Path(cfg.output.save_dir) / opts.sweep_name
    json_path, csv_path = write_results(rows, cfg, opts, out_dir)
    print(f"\nsweep {opts.sweep_name} ranked by best val PSNR ({time.time() - t0:.0f}s):")
    print(format_table(rows), end="")
    print(f"results: {json_path}\n         {csv_path}")
    print(f"Tune experiment: {sweep_dir(cfg.storage_path(), opts.sweep_name)}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    cfg, opts = parse_sweep_args(argv)
    try:
        rows = run_sweep(cfg, opts)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.error]
    if failed:
        print(f"{len(failed)} trial(s) failed: {', '.join(r.trial_id for r in failed)}")
    return 1 if rows and len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
