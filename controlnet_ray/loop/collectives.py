"""Collectives across the training workers, through ``torch.distributed``: no-ops without a
process group, so one process is a world of one (the in-process tests).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from controlnet_ray import checkpoint as ckpt


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def from_rank_zero(obj: Any, device: torch.device | None = None) -> Any:
    """Rank 0's ``obj`` on every rank: a starting checkpoint is read once (by rank 0, from
    wherever it lives) and sent over the process group, not read by every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG streams, by rank (a collective: every rank calls it)."""
    mine = ckpt.capture_rng_state()
    if not _distributed():
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
