"""Checks of the estimators' inputs: one clear error naming the argument, before any solving."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _as_landmarks(value: Any, name: str, batched: bool) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    want = "[K, 5, 2]" if batched else "[5, 2]"
    ok = arr.ndim == (3 if batched else 2) and arr.shape[-2:] == (5, 2)
    if not ok:
        raise ValueError(f"{name} must have shape {want}, got {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr.reshape(arr.shape[0], -1) if batched else arr))
        where = f" (first at image {int(bad[0][0])})" if batched else ""
        raise ValueError(f"{name} contains NaN or infinite values{where}")
    return arr


def _as_sizes(value: Any, name: str, count: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (count, 2):
        raise ValueError(
            f"{name} must have shape [{count}, 2] (width, height), got {tuple(arr.shape)}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and positive (width, height)")
    return arr


def _as_size(width: Any, height: Any) -> tuple[float, float]:
    try:
        w, h = float(width), float(height)
    except (TypeError, ValueError):
        raise ValueError(f"width/height must be numbers, got {width!r}, {height!r}") from None
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"width/height must be finite and positive, got {width!r}, {height!r}")
    return w, h


def _as_shape(value: Any, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (5, 3) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a finite [5, 3] array, got shape {tuple(arr.shape)}")
    return arr
