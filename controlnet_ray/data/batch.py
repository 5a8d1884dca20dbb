"""The one conversion from the pipeline's uint8 images to the model's batch, on the device.

Ray Data delivers ``source`` and ``target`` as uint8 ``[B, H, W, 3]`` RGB (a quarter of the
bytes of float32, and no layout change on the CPU that Ray Data shares with the workers) and
the poses as float32 ``[B, 3]`` degrees. :func:`to_model_batch` turns that into the engine's
batch (``docs/CONTRACTS.md``: float32 ``[B, 3, H, W]`` in [-1, 1]) where the tensors already
are, i.e. on the training device, and applies the mirror augmentation there. Every other path
that needs normalised images (``decode.decode_images`` for evaluation, judging and the
benchmarks) goes through :func:`normalise_images`, so the scaling lives in one place.

Torch only: no Ray, no data readers, so the worker (and tests) call it directly; the engine
stays unaware of how batches were stored.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

IMAGE_KEYS = ("source", "target")
POSE_KEYS = ("source_pose", "target_pose")
MIRROR_SIGN = (-1.0, 1.0, -1.0)  # a left-right mirror negates yaw and roll, keeps pitch


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` RGB -> float32 ``[..., 3, H, W]`` in [-1, 1], contiguous.

    ``(x - 127.5) / 127.5`` exactly as the former OpenCV decode computed it (same float32
    operations), so 0 -> -1 and 255 -> 1.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    if images.shape[-1] != 3:
        raise ValueError(f"expected [..., H, W, 3] RGB images, got shape {list(images.shape)}")
    out = (images.to(torch.float32) - 127.5) * (1.0 / 127.5)
    return out.movedim(-1, -3).contiguous()


def to_model_batch(
    batch: Mapping[str, torch.Tensor],
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The pipeline's batch -> the engine's batch, computed on the batch's own device.

    ``flip``: mirror each pair with probability 1/2 -- both images left-right, yaw and roll of
    both poses negated (pitch is unchanged by a left-right mirror), which keeps the pair
    consistent with the pose convention. The coin tosses come from ``generator`` or torch's
    global CPU generator, which the worker seeds per rank and checkpoints, so the mirrors are
    reproducible per seed and continue exactly on resume.
    """
    missing = [k for k in (*IMAGE_KEYS, *POSE_KEYS) if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}")
    out = {k: normalise_images(batch[k]) for k in IMAGE_KEYS}
    out |= {k: batch[k].to(torch.float32) for k in POSE_KEYS}
    if not flip:
        return out
    n = out["source"].shape[0]
    mirror = (torch.rand(n, generator=generator) < 0.5).to(out["source"].device)
    sign = torch.tensor(MIRROR_SIGN, device=out["source_pose"].device)
    for k in IMAGE_KEYS:
        out[k] = torch.where(mirror[:, None, None, None], out[k].flip(-1), out[k])
    for k in POSE_KEYS:
        out[k] = torch.where(mirror[:, None], out[k] * sign, out[k])
    return out
