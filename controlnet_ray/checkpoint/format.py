"""What a ``.pth`` file holds by name: its format version, the original script's keys, the
optional keys added on top, and the one error type (with how it lists mismatches)."""

from __future__ import annotations

from collections.abc import Sequence

FORMAT_VERSION = 1
LEGACY_FORMAT_VERSION = 0  # files without ``format_version``: written by the original script
# Epochs are 1-based: the loop is ``for epoch in range(start_epoch, epochs + 1)`` and ``epoch``
# in a file is the last completed one, so a continuation starts at ``epoch + 1``.
FRESH_START_EPOCH = 1

# Keys the original script's readers rely on; ``model_state_dict`` alone marks a file as ours.
LEGACY_KEYS = (
    "epoch",
    "model_state_dict",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "best_val_loss",
    "best_val_psnr",
    "train_metrics_history",
    "val_metrics_history",
    "args",
)
# sha256 of everything else in the file (see content_digest), verified by load_checkpoint:
# flipped bytes inside a tensor record load without complaint from torch's zip reader.
CONTENT_DIGEST_KEY = "content_sha256"
# The adversarial option's discriminator (--adversarial_loss_weight > 0): optional keys, absent
# from files of runs without it; the generator's keys never hold it (inference loads those alone).
DISC_KEY = "discriminator_state_dict"
DISC_OPTIMIZER_KEY = "discriminator_optimizer_state_dict"
# How the training data's single-image poses were estimated (data.pose.PhotoPoseModel.to_dict:
# the dataset's mean face, bias, the train split's pose ranges): optional, absent from older files.
POSE_ESTIMATE_KEY = "pose_estimate"
_MAX_LISTED = 5  # mismatches named per category in error messages


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit this run; the message names the file."""


def _listed(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f"; ... and {more} more" if more > 0 else "")
