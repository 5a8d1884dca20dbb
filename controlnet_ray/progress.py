"""Driver-side progress: one console line per epoch from what rank 0 reported.

Printing on the driver (a Ray Train callback) rather than in the workers keeps the lines free
of Ray's per-actor prefixes and of the duplicate that Train's print patch makes.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback


def format_epoch_line(m: dict[str, Any]) -> str:
    """The per-epoch line: losses, validation quality, throughput, elapsed and ETA."""
    epoch, total = int(m["epoch"]), int(m["epochs"])
    done = epoch - int(m.get("first_epoch", 1)) + 1
    eta = m["elapsed_s"] / max(done, 1) * (total - epoch)
    return (
        f"epoch {epoch}/{total}  train loss {m['train_loss']:.4f} "
        f"(img {m['train_image_loss']:.4f} pose {m['train_pose_loss']:.4f})  "
        f"val loss {m['val_loss']:.4f}  PSNR {m['val_psnr']:.2f} dB  SSIM {m['val_ssim']:.3f}  "
        f"pose err {m['val_pose_mae_deg']:.1f} deg  {m['samples_per_sec']:.1f} samples/s  "
        f"epoch {m['epoch_time_s']:.1f}s  elapsed {m['elapsed_s']:.0f}s  ETA {eta:.0f}s"
    )


class EpochPrinter(UserCallback):
    """Prints rank 0's epoch metrics as they are reported."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics and "val_psnr" in metrics[0]:
            print(format_epoch_line(metrics[0]), flush=True)
