"""Resource planning of a run: how the CPUs are shared between the training workers and Ray
Data (which hangs forever without a CPU left beside the workers), and what the run holds at
once, for :mod:`controlnet_ray.capacity` to check against the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlnet_ray.capacity import DATA_CPUS, Need, worker_share
from controlnet_ray.config import TrainConfig


@dataclass
class ResourcePlan:
    """How many CPUs Ray sees and how they are shared between training and data."""

    ray_num_cpus: int | None  # logical CPUs for a local Ray; None: use the cluster as is
    cpus_per_worker: float
    torch_threads: int

    def describe(self, cfg: TrainConfig) -> str:
        return (
            f"{cfg.ray.num_ray_workers} training worker(s) x {self.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if cfg.ray.use_gpu else ''}, {DATA_CPUS:g} CPU kept for Ray Data, "
            f"{self.torch_threads} torch thread(s) per worker"
        )


def plan_resources(cfg: TrainConfig, available_cpus: float, local: bool) -> ResourcePlan:
    """Share the CPUs so that Ray Data always keeps one, whatever the worker count.

    Locally Ray gets the machine's core count as logical CPUs; when that is too small for the
    requested workers (e.g. 2 workers on 2 cores) each worker reserves a fraction of a CPU
    (:func:`worker_share`). Whether a cluster holds the plan is :func:`resource_need`'s
    business.
    """
    cpw, threads = worker_share(cfg, available_cpus - DATA_CPUS, local)
    needed = cfg.ray.num_ray_workers * cpw + DATA_CPUS
    ray_cpus = max(int(available_cpus), int(needed + 0.999)) if local else None
    return ResourcePlan(ray_num_cpus=ray_cpus, cpus_per_worker=cpw, torch_threads=threads)


def resource_need(cfg: TrainConfig, plan: ResourcePlan) -> Need:
    """What the run holds at once: its workers (a GPU each with --use_gpu) and Ray Data's CPU."""
    n, cpw, gpu = cfg.ray.num_ray_workers, plan.cpus_per_worker, cfg.ray.use_gpu
    worker = {"CPU": cpw, "GPU": 1.0} if gpu else {"CPU": cpw}
    totals = {"CPU": n * cpw + DATA_CPUS, **({"GPU": float(n)} if gpu else {})}
    return Need(
        totals=totals,
        bundles=(*[worker] * n, {"CPU": DATA_CPUS}),
        flags=(
            f"--num_ray_workers {n} x (--cpus_per_worker {cpw:g}"
            f"{' + 1 GPU for --use_gpu' if gpu else ''}) + {DATA_CPUS:g} CPU for Ray Data"
        ),
        remedy="lower --num_ray_workers or --cpus_per_worker"
        + ("; drop --use_gpu to train on CPU" if gpu else ""),
    )
