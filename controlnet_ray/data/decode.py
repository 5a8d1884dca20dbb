"""Image bytes -> arrays: the one decoder of shard images (PNG/JPEG via OpenCV).

Its own module, importing neither Ray nor pyarrow, so evaluation, judging and the benchmarks
decode exactly as the training pipeline does on a machine that has only the model's needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

__all__ = ["decode_image", "decode_images", "decode_pairs", "decode_rgb"]


def decode_rgb(blobs: Sequence[bytes | memoryview | np.ndarray]) -> np.ndarray:
    """PNG/JPEG bytes of equal-size images -> uint8 ``[N, H, W, 3]`` RGB.

    Raises instead of returning zeros (an undecodable image, or images of different sizes).
    """
    out: np.ndarray | None = None
    for i, data in enumerate(blobs):
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if arr is None:
            raise ValueError(f"undecodable image bytes in shard (image {i} of {len(blobs)})")
        if out is None:
            out = np.empty((len(blobs), *arr.shape), np.uint8)
        if arr.shape != out.shape[1:]:
            raise ValueError(
                f"image {i} of {len(blobs)} is {arr.shape[1]}x{arr.shape[0]}, the first "
                f"{out.shape[2]}x{out.shape[1]}: shards hold one image size"
            )
        cv2.cvtColor(arr, cv2.COLOR_BGR2RGB, dst=out[i])
    if out is None:
        raise ValueError("no images to decode")
    return out


def decode_images(blobs: Sequence[bytes]) -> np.ndarray:
    """PNG/JPEG bytes -> float32 NCHW RGB in [-1, 1] (evaluation, judging, benchmarks).

    The scaling is :func:`controlnet_ray.data.batch.normalise_images`, the one the workers
    apply on their device to the pipeline's uint8 batches.
    """
    import torch

    from controlnet_ray.data.batch import normalise_images

    return normalise_images(torch.from_numpy(decode_rgb(blobs))).numpy()


def decode_image(data: bytes) -> np.ndarray:
    """One image's bytes -> float32 CHW RGB in [-1, 1]."""
    return decode_images([data])[0]


def decode_pairs(
    batch: dict[str, Any], flip: bool = False, generator: Any = None
) -> dict[str, np.ndarray]:
    """Pairs given with their bytes (``source``, ``target``, poses) -> the model's float batch
    as numpy, through :func:`~controlnet_ray.data.batch.to_model_batch` (mirroring included).

    For in-memory callers (benchmarks, tests); training decodes through the index pipeline.
    """
    import torch

    from controlnet_ray.data.batch import to_model_batch

    raw = {k: torch.from_numpy(decode_rgb(batch[k])) for k in ("source", "target")}
    for k in ("source_pose", "target_pose"):
        raw[k] = torch.from_numpy(np.stack(batch[k]).astype(np.float32))
    out = to_model_batch(raw, flip=flip, generator=generator)
    return {k: v.numpy() for k, v in out.items()}
