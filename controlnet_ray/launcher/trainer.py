"""The TorchTrainer of a run (Train v2 API): scaling, run and checkpoint configuration, the
per-worker loop's config, and ``--resume`` put in the object store for rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from controlnet_ray import run_files
from controlnet_ray.config import TrainConfig
from controlnet_ray.launcher.resources import ResourcePlan

if TYPE_CHECKING:
    from controlnet_ray.data.pipeline import PairDatasets


def build_trainer(
    cfg: TrainConfig,
    plan: ResourcePlan,
    pairs: PairDatasets,
    *,
    progress_board: Any | None = None,
    callbacks: Sequence[Any] = (),
):
    """The TorchTrainer for this run (Train v2 API).

    ``progress_board``: the driver's console actor (see :mod:`controlnet_ray.progress`); without
    one the lines are printed where they arise. ``callbacks``: extra Train callbacks (Tune's).
    """
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from controlnet_ray.epoch_lines import EpochLines
    from controlnet_ray.worker import train_loop_per_worker

    scaling = ScalingConfig(
        num_workers=cfg.ray.num_ray_workers,
        use_gpu=cfg.ray.use_gpu,
        resources_per_worker={"CPU": plan.cpus_per_worker},
    )
    run_config = RunConfig(
        name=cfg.run_name(),
        storage_path=cfg.storage_path(),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.ray.num_to_keep,
            checkpoint_score_attribute=cfg.output.best_metric,
            checkpoint_score_order=run_files.score_order(cfg.output.best_metric),
        ),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        logging_config=LoggingConfig(log_level="WARNING"),
        callbacks=[EpochLines(progress_board), *callbacks],
    )
    loop_config = {
        "config": cfg.to_dict(),
        "shards_dir": str(pairs.shards_dir),
        "pose_estimate": pose_estimate(pairs.shards_dir),
        "num_train_pairs": pairs.num_train_pairs,
        "torch_threads": plan.torch_threads,
        "progress_board": progress_board,
        "resume_state": resume_state_ref(cfg),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        datasets={"train": pairs.train, "val": pairs.val},
        dataset_config=DataConfig(execution_options=ingest_options()),
    )


def ingest_options() -> Any:
    """Ray Data's options for the run's datasets: Train's defaults (the driver's DataContext
    options) without ``exclude_resources``, which Train's defaults pass on and Ray Data 2.60
    answers with a deprecation warning. The run never excludes resources (Train v2 reserves
    the workers' own), so nothing is lost."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )


def pose_estimate(shards_dir: Any) -> dict[str, Any] | None:
    """How the run's data estimated a single image's pose, from its manifest (for the
    checkpoints, so ``generate`` estimates a photo's pose the same way); None without shards."""
    if not shards_dir:
        return None
    from controlnet_ray.data.pose import PhotoPoseModel
    from controlnet_ray.data.shards import load_manifest

    return PhotoPoseModel.from_pose_report(load_manifest(shards_dir).pose_report).to_dict()


def resume_state_ref(cfg: TrainConfig) -> Any:
    """--resume read here, where the path was given, and put in Ray's object store (None
    without --resume): rank 0 takes it from there, so the file need not exist on its node."""
    if not cfg.output.resume:
        return None
    import ray

    from controlnet_ray import checkpoint as ckpt

    return ray.put(ckpt.load_checkpoint(cfg.output.resume))
