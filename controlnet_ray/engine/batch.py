"""The batch the engine takes (four float tensors) and the model call on it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]
BATCH_KEYS = ("source", "target", "source_pose", "target_pose")


def move_batch(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Copy the four batch tensors to ``device`` as float32 (non-blocking from pinned memory)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing}; expected keys {list(BATCH_KEYS)}")
    raw = [k for k in BATCH_KEYS if batch[k].dtype == torch.uint8]
    if raw:  # the pipeline's uint8 images would silently train as 0..255
        raise TypeError(f"batch {raw} are uint8: normalise them first (data.batch.to_model_batch)")
    return {k: batch[k].to(device, dtype=torch.float32, non_blocking=True) for k in BATCH_KEYS}


def _forward(model: nn.Module, batch: Batch) -> Any:
    return model(
        batch["source"], batch["source_pose"], batch["target_pose"], target=batch["target"]
    )
