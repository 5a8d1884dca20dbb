"""Driver side of a run: data preparation, Ray start-up, resource planning, the TorchTrainer.

Resource planning exists because of two traps measured with Ray 2.60: Ray Data hangs forever
without a CPU left beside the training workers, and a GPU request on a GPU-less cluster is
retried forever instead of failing.

Modules, in the order a run uses them (:func:`run_training`, in ``run``): ``checks``
(everything known before Ray starts, and :data:`EXPECTED_ERRORS`), ``rerun`` (a re-run's Ray
run on disk: continue, ``--fresh``, unregistered checkpoints), ``data`` (shards and pair
datasets on the driver), ``resources`` (the CPU plan and what the run holds), ``connection``
(starting or joining Ray, multi-node path checks, stopping a local Ray), ``trainer`` (the
TorchTrainer), ``mirror`` (outputs copied down to the driver). The names below are
re-exported so ``controlnet_ray.launcher.<name>`` keeps working.
"""

from controlnet_ray.launcher.checks import (
    EXPECTED_ERRORS,
    absolute_paths,
    check_before_ray,
    check_data,
    check_outputs,
    check_resume_file,
    check_writable_dir,
    output_dirs,
)
from controlnet_ray.launcher.connection import (
    PROBE_TIMEOUT_S,
    SHARED_HINT,
    check_cluster_paths,
    check_train_v2,
    cluster_is_multi_node,
    init_ray,
    joins_cluster,
    nodes_missing,
    shutdown_local_ray,
)
from controlnet_ray.launcher.data import build_pairs, prepare_data, resolve_shards, train_judges
from controlnet_ray.launcher.mirror import (
    MIRROR_INTERVAL_S,
    OutputMirror,
    fit_with_outputs,
    materialise_outputs,
)
from controlnet_ray.launcher.rerun import (
    RAY_SNAPSHOT_FILE,
    check_rerun,
    discard_previous_run,
    existing_run,
    latest_ray_checkpoint,
    prune_unregistered_checkpoints,
    read_run_record,
    set_aside_other_runs,
)
from controlnet_ray.launcher.resources import ResourcePlan, plan_resources, resource_need
from controlnet_ray.launcher.run import print_judged_summary, run_training
from controlnet_ray.launcher.trainer import build_trainer, resume_state_ref

__all__ = [
    "EXPECTED_ERRORS",
    "MIRROR_INTERVAL_S",
    "PROBE_TIMEOUT_S",
    "RAY_SNAPSHOT_FILE",
    "SHARED_HINT",
    "OutputMirror",
    "ResourcePlan",
    "absolute_paths",
    "build_pairs",
    "build_trainer",
    "check_before_ray",
    "check_cluster_paths",
    "check_data",
    "check_outputs",
    "check_resume_file",
    "check_rerun",
    "check_writable_dir",
    "cluster_is_multi_node",
    "discard_previous_run",
    "existing_run",
    "fit_with_outputs",
    "check_train_v2",
    "init_ray",
    "joins_cluster",
    "latest_ray_checkpoint",
    "materialise_outputs",
    "nodes_missing",
    "output_dirs",
    "plan_resources",
    "prepare_data",
    "print_judged_summary",
    "prune_unregistered_checkpoints",
    "read_run_record",
    "resolve_shards",
    "resource_need",
    "resume_state_ref",
    "run_training",
    "set_aside_other_runs",
    "shutdown_local_ray",
    "train_judges",
]
