"""``run_training``: a whole run, in order: check inputs and prepare the data (against a
cluster, a first-time preparation and the judges' training wait for the connection and the
run's resources, and run as Ray tasks on its nodes), start Ray sized by the plan or join the
cluster, hold the resources, train with the console drawing progress, copy the outputs down,
print the held-out judged summary, stop the local Ray this run started.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from controlnet_ray import capacity
from controlnet_ray.config import TrainConfig
from controlnet_ray.launcher.checks import absolute_paths, check_before_ray
from controlnet_ray.launcher.connection import (
    check_cluster_paths,
    init_ray,
    joins_cluster,
    shutdown_local_ray,
)
from controlnet_ray.launcher.data import build_pairs, prepare_data
from controlnet_ray.launcher.mirror import fit_with_outputs
from controlnet_ray.launcher.rerun import (
    discard_previous_run,
    existing_run,
    prune_unregistered_checkpoints,
    set_aside_other_runs,
)
from controlnet_ray.launcher.resources import ResourcePlan, plan_resources, resource_need
from controlnet_ray.launcher.trainer import build_trainer


def run_training(cfg: TrainConfig) -> object:
    """Check inputs and prepare data, then start Ray and train; returns Ray's Result."""
    t0 = time.time()
    given_storage_path = cfg.ray.storage_path
    cfg = absolute_paths(cfg)
    local = not joins_cluster(cfg)
    plan = plan_resources(cfg, float(os.cpu_count() or 1), local=True) if local else None
    if plan is not None:  # a local Ray cannot grow: a shortfall (no GPU) is known now
        capacity.ensure(
            resource_need(cfg, plan),
            0,
            fixed=True,
            cluster=capacity.local_machine(plan.ray_num_cpus),
        )
    data = check_before_ray(cfg, defer_preparation=not local)
    if cfg.ray.fresh:
        discard_previous_run(cfg)
    elif (previous := existing_run(cfg)) is not None:
        print(
            f"found Ray run {cfg.run_name()} at {previous}: resuming from its latest "
            "checkpoint if any (--fresh starts over)",
            flush=True,
        )
    set_aside_other_runs(cfg)
    started_ray = init_ray(cfg, plan.ray_num_cpus if plan else None)
    if plan is None:
        import ray

        plan = plan_resources(cfg, ray.cluster_resources().get("CPU", 0), local=False)
    check_cluster_paths(cfg, given_storage_path)
    # Held before a first-time preparation: a cluster that can never hold the run is refused
    # before that work, and on one that autoscales from no workers (a 0-CPU head) the request
    # brings the nodes that the preparation's Ray tasks (and the judges' training) run on.
    with capacity.held(resource_need(cfg, plan), cfg.ray.resource_wait_s, fixed=local):
        shards = data.shards or prepare_data(cfg, data.source)  # deferred on a cluster
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
