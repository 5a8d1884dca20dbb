"""``python -m controlnet_ray.tune``: the training parser plus the sweep flags, and the driver
that checks its inputs before Ray, prepares the shards and judges once (against a cluster:
after connecting, as Ray tasks on its nodes, as training does), runs (or resumes) the sweep
and prints the ranked table."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from controlnet_ray import capacity
from controlnet_ray.cli import build_parser, namespace_to_config, normalize_argv
from controlnet_ray.config import LOSS_TYPES, ConfigError, TrainConfig
from controlnet_ray.tune.resources import start_ray, sweep_need
from controlnet_ray.tune.search_space import (
    SCHEDULERS,
    SweepOptions,
    sweep_metric,
    validate_sweep,
)
from controlnet_ray.tune.summary import (
    TrialSummary,
    format_table,
    rank,
    summaries_from_grid,
    write_results,
)
from controlnet_ray.tune.trials import (
    discard_previous_sweep,
    make_tuner,
    set_aside_other_sweep,
    sweep_dir,
)


def build_sweep_parser() -> argparse.ArgumentParser:
    """The training parser plus a "sweep" group, so every training flag works unchanged."""
    p = build_parser(prog="python -m controlnet_ray.tune")
    p.description = (
        "Ray Tune sweep of ImageControlNet training runs, ranked (and cut short by ASHA) by "
        "--best_metric, face PSNR by default. "
        "Takes every training flag of python -m controlnet_ray.train; --epochs is the "
        "longest a trial may run. Re-running the same command resumes the sweep; with other "
        "settings under the same --sweep_name it is a new sweep (the old one moved aside)."
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
        help="ASHA: epochs every trial runs before it may be stopped (default: a quarter of "
        "--epochs, at least 1)",
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


def run_sweep(cfg: TrainConfig, opts: SweepOptions) -> list[TrialSummary]:
    """Check the inputs before Ray (the launcher's checks: output folders, --resume, the
    data), prepare the shards and judges once (locally before Ray, against a cluster after
    connecting, on its nodes), run (or resume) the sweep, print and write the ranked table."""
    from controlnet_ray.launcher import (
        absolute_paths,
        build_pairs,
        check_cluster_paths,
        check_data,
        check_outputs,
        check_train_v2,
        joins_cluster,
        prepare_data,
    )

    t0 = time.time()
    given_storage_path = cfg.ray.storage_path
    cfg = absolute_paths(cfg)
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, run_name=None))
    check_train_v2()
    check_outputs(cfg)
    data = check_data(cfg, defer_preparation=joins_cluster(cfg))
    if cfg.ray.fresh:
        discard_previous_sweep(cfg, opts)
    set_aside_other_sweep(cfg, opts)
    plan, local = start_ray(cfg, opts)
    print(f"sweep {opts.sweep_name}: {opts.grid_size()} trial(s); {plan.describe(cfg)}", flush=True)
    check_cluster_paths(cfg, given_storage_path)
    # Held first, as a training run does: on a cluster that autoscales from no workers the
    # request brings the nodes a deferred preparation's Ray tasks run on.
    with capacity.held(sweep_need(cfg, plan), cfg.ray.resource_wait_s, fixed=local):
        shards = data.shards or prepare_data(cfg, data.source)  # deferred on a cluster
        pairs = build_pairs(cfg, shards)
        grid = make_tuner(cfg, opts, plan, pairs).fit()
    metric, mode = sweep_metric(cfg)
    rows = rank(summaries_from_grid(grid, cfg, opts), mode)
    out_dir = Path(cfg.output.save_dir) / opts.sweep_name
    json_path, csv_path = write_results(rows, cfg, opts, out_dir)
    print(f"\nsweep {opts.sweep_name} ranked by best {metric} ({time.time() - t0:.0f}s):")
    print(format_table(rows, metric), end="")
    print(f"results: {json_path}\n         {csv_path}")
    print(f"Tune experiment: {sweep_dir(cfg.storage_path(), opts.sweep_name)}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    cfg, opts = parse_sweep_args(argv)
    from controlnet_ray.launcher import EXPECTED_ERRORS
    from controlnet_ray.train import one_line

    try:
        rows = run_sweep(cfg, opts)
    except EXPECTED_ERRORS as exc:  # bad input found by the checks (before Ray): one line, rc 2
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.error]
    if failed:
        print(f"{len(failed)} trial(s) failed: {', '.join(r.trial_id for r in failed)}")
    return 1 if rows and len(failed) == len(rows) else 0
