"""The RNG streams a checkpoint carries: capture, restore, and each rank's own stream."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy-global / ``random`` streams, weights_only-safe.

    numpy's MT19937 key becomes an int64 tensor and ``random``'s state a tuple of ints because
    numpy arrays are not loadable with ``weights_only=True``.  Generators created with
    ``np.random.default_rng`` are not global state and are not captured.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": (int(version), tuple(int(x) for x in internal), gauss_next),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA streams restored for the devices both have."""
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        for device, rng in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))


def rng_state_for_rank(state: Mapping[str, Any], rank: int) -> Mapping[str, Any] | None:
    """The RNG streams ``rank`` saved (``rank_rng_states``), so each rank of a resumed run
    continues its own stream instead of all taking rank 0's. Files without per-rank states
    (older ones, the original script's) give rank 0 ``rng_state`` and other ranks None."""
    per_rank = state.get("rank_rng_states") or []
    if rank < len(per_rank):
        return per_rank[rank]
    return state.get("rng_state") if rank == 0 else None


def seed_rank_streams(seed: int, rank: int, epoch: int) -> None:
    """Seed torch / numpy / ``random`` for a rank the checkpoint saved no streams for (a
    resume with more workers): a stream of its own, derived from (seed, rank, epoch), rather
    than a repeat of the one it started the run with."""
    derived = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)
