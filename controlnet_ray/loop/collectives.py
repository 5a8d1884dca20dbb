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


def collective_device(t: torch.Tensor) -> torch.device:
    """Where ``t`` must be for a collective of this process group: NCCL (the GPU workers'
    backend) reduces CUDA tensors only, so host-side sums go to this rank's GPU for the call;
    gloo takes them where they are."""
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (a copy, on ``t``'s device); ``t`` itself without DDP."""
    if not _distributed():
        return t
    out = t.to(collective_device(t), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


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
