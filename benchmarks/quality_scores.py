"""``benchmarks/quality.py``'s scores: PSNR of the model and the trivial predictors on
held-out pairs, the margins over the best trivial predictor, the sample grid and the judged
report (``controlnet_ray.judging``)."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from quality_data import pair_batch

from controlnet_ray.config import DataConfig
from controlnet_ray.judging import TRIVIAL, TrivialPredictors
from controlnet_ray.judging.session import prepare_judging
from controlnet_ray.metrics import psnr_per_image, to_unit_range

PREDICTORS = ("model", *TRIVIAL)


TARGETS_DB = {"whole": 0.7, "face": 2.0}  # the targets: margin over the best trivial


@dataclass
class Scores:
    sums: dict[str, dict[str, float]] = field(
        default_factory=lambda: {p: {"whole": 0.0, "face": 0.0} for p in PREDICTORS}
    )
    n: int = 0

    def add(self, name: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        self.sums[name]["whole"] += float(psnr_per_image(pred, target).double().sum())
        self.sums[name]["face"] += float(psnr_per_image(pred, target, mask).double().sum())

    def means(self, names: tuple[str, ...] = PREDICTORS) -> dict[str, dict[str, float]]:
        return {p: {r: v / max(self.n, 1) for r, v in self.sums[p].items()} for p in names}


def margins(means: dict[str, dict[str, float]]) -> dict[str, dict[str, object]]:
    out = {}
    for region in ("whole", "face"):
        best = max(TRIVIAL, key=lambda p: means[p][region])
        margin = means["model"][region] - means[best][region]
        out[region] = {
            "best_trivial": best,
            "margin_db": margin,
            "target_db": TARGETS_DB[region],
            "met": margin >= TARGETS_DB[region],
        }
    return out


def evaluate_pairs(
    model: torch.nn.Module,
    rows: dict[str, np.ndarray],
    pairs: np.ndarray,
    trivial: TrivialPredictors | None,
    mask: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch_size: int,
) -> Scores:
    """PSNR sums of the model (and of the trivial predictors when ``trivial`` is given)."""
    scores = Scores()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            idx = pairs[i : i + batch_size]
            b = pair_batch(rows, idx, flip=False)
            src, tgt = b["source"].to(device), b["target"].to(device)
            ctx = (
                torch.autocast(device.type, dtype=amp_dtype)
                if amp_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                out = model.generate(src, b["source_pose"].to(device), b["target_pose"].to(device))
            scores.add("model", out.float(), tgt, mask)
            if trivial is not None:
                poses = (b["source_pose"].to(device), b["target_pose"].to(device))
                for name, predict in trivial.as_dict().items():
                    scores.add(name, predict(src, *poses), tgt, mask)
            scores.n += len(idx)
    model.train(was_training)
    return scores


def write_samples(
    path: Path,
    model: torch.nn.Module,
    rows: dict[str, np.ndarray],
    pairs: np.ndarray,
    trivial: TrivialPredictors,
    device: torch.device,
) -> None:
    """One row per pair: source | target | pose-bin mean | model output (PNG via OpenCV)."""
    import cv2

    b = pair_batch(rows, pairs, flip=False)
    model.eval()
    with torch.no_grad():
        out = (
            model.generate(
                b["source"].to(device), b["source_pose"].to(device), b["target_pose"].to(device)
            )
            .float()
            .cpu()
        )
    binned = trivial.pose_bin(b["source"], b["source_pose"], b["target_pose"])
    grid = torch.cat(
        [
            torch.cat([b["source"][i], b["target"][i], binned[i], out[i]], dim=2)
            for i in range(len(pairs))
        ],
        dim=1,
    )
    img = (to_unit_range(grid).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def judge_final(
    args: argparse.Namespace, shards: Path, model: torch.nn.Module, device: torch.device
) -> dict:
    """The full judged report (``controlnet_ray.judging``) of ``model`` on the held-out pairs,
    with the pose judge trained on (or loaded for) these shards' train persons."""
    cache = DataConfig(cache_dir=args.cache_dir).resolved_cache_dir()
    judging = prepare_judging(
        shards,
        cache,
        min_deg=args.min_pose_distance,
        max_deg=args.max_pose_distance,
        max_pairs=args.eval_max_pairs or 0,
    )
    model.eval()
    report = judging.report(model.generate, device)
    report.pop("per_image")  # the figures, not 10^4 per-image values, go to --json
    return report
