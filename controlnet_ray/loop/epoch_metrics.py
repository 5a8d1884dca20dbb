"""What each epoch reports (the metrics Ray ranks checkpoints by, Tune schedules on and the
console line shows), and the guard that none of it is non-finite.
"""

from __future__ import annotations

import math

from controlnet_ray.engine import NonFiniteLossError
from controlnet_ray.loop.validation import JUDGED_KEYS


def epoch_metrics(
    epoch: int, epochs: int, first_epoch: int, train: dict, val: dict, elapsed: float
) -> dict:
    """What each epoch reports (and what the console line shows); never a NaN score (Ray's
    checkpoint ranking and Tune's schedulers break on one). ``first_epoch``: the epoch
    this run started at (the console tells a resumed run by it)."""
    metrics = {
        "epoch": epoch,
        "epochs": epochs,
        "first_epoch": first_epoch,
        "train_loss": train["loss"],
        "train_image_loss": train["image_loss"],
        "train_pose_loss": train["pose_loss"],
        "val_loss": val["loss"],
        "val_psnr": val["psnr"],
        "val_psnr_face": val["psnr_face"],
        "val_ssim": val["ssim"],
        "val_pose_mae_deg": val["pose_mae_deg"],
        "samples_per_sec": train["samples_per_sec"],
        "epoch_time_s": train["epoch_time_s"],
        "elapsed_s": elapsed,
        **{k: v for k, v in val.items() if k in JUDGED_KEYS},
    }
    return _require_finite(metrics, f"epoch {epoch}")


def _require_finite(metrics: dict[str, float], what: str) -> dict[str, float]:
    """``metrics`` unchanged when every value is finite, else NonFiniteLossError naming them."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        shown = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise NonFiniteLossError(
            f"{what} gave non-finite metrics ({shown}): the model diverged; nothing of this "
            "epoch is recorded or saved. Lower --lr or check the loss weights and the data."
        )
    return metrics
