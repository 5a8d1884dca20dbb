"""Where trials run and what they hold: trials at once, each trial's CPUs (function +
workers) with one CPU always left for Ray Data, and starting or joining Ray for the sweep."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from controlnet_ray.capacity import DATA_CPUS, Need, worker_share
from controlnet_ray.config import TrainConfig
from controlnet_ray.tune.search_space import SweepOptions

TRIAL_CPUS = 0.25  # the trial function only waits on its trainer; zero CPUs fails at start
# A custom resource the cluster configs declare on the head node (never preempted): when the
# cluster has it, every trial function (and so its Train controller, which Ray places on the
# trial's node) asks for a sliver of it and no CPU, so trials never land on preemptible GPU
# workers. A cluster without it (a local Ray) places trials by CPU as before.
DRIVER_RESOURCE = "driver_node"
DRIVER_SHARE = 0.001


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

    Workers get what is left of a trial's share (``capacity.worker_share``). Locally a
    shortfall is covered by giving Ray more logical CPUs than cores (the launcher does the
    same); whether a cluster holds the plan is :func:`sweep_need`'s business.
    ``on_driver_nodes``: the cluster has DRIVER_RESOURCE, where trials run without a CPU.
    """
    n = cfg.ray.num_ray_workers
    trial_cpus = 0.0 if on_driver_nodes else TRIAL_CPUS
    concurrency = opts.max_concurrent_trials or default_concurrency(cfg, cpus, gpus)
    concurrency = min(concurrency, opts.grid_size())
    budget = (cpus - DATA_CPUS) / concurrency - trial_cpus  # one trial's workers
    cpw, threads = worker_share(cfg, budget, local)
    needed = concurrency * (trial_cpus + n * cpw) + DATA_CPUS
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


def start_ray(cfg: TrainConfig, opts: SweepOptions) -> tuple[SweepPlan, bool]:
    """Connect (or start a local Ray sized for the sweep) and plan the trials' resources;
    also returns whether the cluster is local (fixed: a shortfall fails at once)."""
    import ray

    from controlnet_ray.launcher import init_ray, joins_cluster

    local = not joins_cluster(cfg)
    if local:
        plan = plan_sweep(cfg, opts, float(os.cpu_count() or 1), 0.0, local=True)
        init_ray(cfg, plan.ray_num_cpus)
    else:
        init_ray(cfg, None)
    res = ray.cluster_resources()
    on_driver = res.get(DRIVER_RESOURCE, 0.0) > 0
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    return plan_sweep(cfg, opts, cpus, gpus, local=local, on_driver_nodes=on_driver), local
