"""An epoch's held-out figures: the validation pass summed over every rank (the reduce), and
rank 0's independent judges (``controlnet_ray.judging``) flattened into epoch metrics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from controlnet_ray import checkpoint as ckpt
from controlnet_ray.config import OptimConfig, TrainConfig
from controlnet_ray.data.batch import to_model_batch
from controlnet_ray.engine import AmpSettings, EvalSums, evaluate
from controlnet_ray.loop.collectives import all_reduce_sum
from controlnet_ray.loop.host import WorkerHost

JUDGED_MAX_PAIRS = 256  # validation pairs the judges score each epoch (an even subset)
JUDGED_KEYS = (
    "judged_yaw_err_deg",
    "judged_pitch_err_deg",
    "judge_floor_yaw_deg",
    "judge_floor_pitch_deg",
    "face_margin_db",
    "id_top1",
    "id_top1_source",
    "id_chance",
    "sharpness",
    "judged_persons",
    "judged_pairs",
)


def build_judging(cfg: TrainConfig, rank: int, shards_dir: str | None) -> Any:
    """Rank 0's independent judges of the val persons (``controlnet_ray.judging``; the
    judge itself was trained by the driver before Ray started), or None when off."""
    if rank != 0 or cfg.output.no_judge or not shards_dir:
        return None
    from controlnet_ray.judging import prepare_judging

    return prepare_judging(
        shards_dir,
        cfg.data.resolved_cache_dir(),
        held_splits=("val",),
        max_pairs=JUDGED_MAX_PAIRS,
        verbose=False,
    )


def judged_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The headline of a judged report as flat epoch metrics (strict JSON: no None/NaN)."""
    model, floor, head = report["rows"]["model"], report["rows"]["floor"], report["headline"]
    out = {
        "judged_yaw_err_deg": model["pose_err_median_deg"]["yaw"],
        "judged_pitch_err_deg": model["pose_err_median_deg"]["pitch"],
        "judge_floor_yaw_deg": floor["pose_err_median_deg"]["yaw"],
        "judge_floor_pitch_deg": floor["pose_err_median_deg"]["pitch"],
        "face_margin_db": head["face_psnr_margin_db"],
        "id_top1": head["id_top1"],
        "id_top1_source": head.get("id_top1_source"),
        "id_chance": report["chance_id_top1"],
        "sharpness": head["sharpness"],
        "judged_persons": report["num_persons"],
        "judged_pairs": report["num_pairs"],
    }
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def validate(
    model: nn.Module,
    host: WorkerHost,
    cfg: OptimConfig,
    amp: AmpSettings,
    face_region: torch.Tensor | None = None,
) -> EvalSums:
    """One pass over this rank's validation shard, summed over every rank (so each rank holds
    the whole set's figures); rank 0 keeps its first sample for the image summaries.
    ``face_region``: where ``psnr_face`` is taken (``engine.evaluate``)."""
    sums = evaluate(
        ckpt.unwrap_model(model),
        (to_model_batch(b) for b in host.batches(train=False)),
        cfg,
        host.device,
        amp,
        keep_sample=host.rank == 0,
        face_region=face_region,
    )
    reduced = EvalSums.from_tensor(all_reduce_sum(sums.to_tensor()))
    reduced.sample = sums.sample
    return reduced


def judge(judging: Any, model: nn.Module, device: torch.device) -> dict[str, Any]:
    """This epoch's judged headline figures (rank 0; empty elsewhere or when off)."""
    if judging is None:
        return {}
    model = ckpt.unwrap_model(model)
    was_training = model.training
    model.eval()
    try:
        report = judging.report(model.generate, device)
    finally:
        model.train(was_training)
    return judged_metrics(report)
