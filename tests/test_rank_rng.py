"""Each rank's RNG streams survive a checkpoint: two real Gloo ranks, no Ray.

Ranks are seeded ``seed + rank``; a resumed run must continue every rank's own stream, not
hand rank 0's to all of them. The starting file is read by rank 0 alone and broadcast.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from pathlib import Path

import numpy as np
import torch

from controlnet_ray import checkpoint as ckpt
from controlnet_ray import files
from controlnet_ray.config import TrainConfig
from tests.ddp_helpers import run_ranks

SEED = 42


def _draws() -> list[float]:
    """Something from each stream a training step may use."""
    return [
        *torch.rand(3).tolist(),
        *np.random.rand(2).tolist(),
        random.random(),
    ]


def _save(path: Path, rank_states: list[dict]) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = ckpt.build_checkpoint(
        epoch=1,
        model=model,
        optimizer=optimizer,
        scheduler=None,
        cfg=TrainConfig(),
        model_signature={},
        best_val_loss=1.0,
        best_val_psnr=10.0,
        train_history=[],
        val_history=[],
        rng_state=rank_states[0],
        rank_rng_states=rank_states,
    )
    files.atomic_save(state, path)


def _rank_worker(rank: int, world: int, port: int, queue: multiprocessing.Queue) -> None:
    """Train-like draws, a checkpoint, the uninterrupted continuation; then a resume from the
    file (read by rank 0 only) and the draws after it."""
    import torch.distributed as dist

    from controlnet_ray.loop import all_rng_states, from_rank_zero

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(SEED + rank)
        np.random.seed(SEED + rank)
        random.seed(SEED + rank)
        _draws()  # an epoch's worth of use
        states = all_rng_states()
        continued = _draws()
        path = Path(os.environ["RNG_TEST_FILE"])
        if rank == 0:
            _save(path, states)  # (builds a model: draws from rank 0's stream)
        dist.barrier()
        _draws()  # the run goes on: the streams move past the checkpoint
        loaded = from_rank_zero(ckpt.load_checkpoint(path) if rank == 0 else None)
        ckpt.restore_rng_state(ckpt.rng_state_for_rank(loaded, rank))
        queue.put((rank, continued, _draws()))
    finally:
        dist.destroy_process_group()


def test_each_rank_resumes_its_own_stream(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RNG_TEST_FILE", str(tmp_path / "state.pth"))
    results = run_ranks(_rank_worker, world=2, timeout=90)
    for rank in (0, 1):
        continued, resumed = results[rank]
        assert resumed == continued, f"rank {rank} did not continue its own stream"
    assert results[0][0] != results[1][0]  # the ranks' streams differ, so the test can fail
    state = torch.load(tmp_path / "state.pth", weights_only=True)
    assert len(state["rank_rng_states"]) == 2
    assert torch.equal(state["rng_state"]["torch"], state["rank_rng_states"][0]["torch"])


def test_a_rank_without_saved_streams_gets_a_derived_one() -> None:
    """A file from fewer workers (or the original script) has nothing for rank 1: it must not
    take rank 0's stream, nor restart the one it was seeded with."""
    torch.manual_seed(SEED)
    rank0 = {"rng_state": ckpt.capture_rng_state()}
    assert ckpt.rng_state_for_rank(rank0, 0) is rank0["rng_state"]
    assert ckpt.rng_state_for_rank(rank0, 1) is None
    ckpt.seed_rank_streams(SEED, 1, 3)
    derived = torch.rand(4)
    torch.manual_seed(SEED + 1)
    fresh = torch.rand(4)
    ckpt.restore_rng_state(rank0["rng_state"])
    assert not torch.equal(derived, fresh) and not torch.equal(derived, torch.rand(4))
    ckpt.seed_rank_streams(SEED, 1, 3)
    assert torch.equal(torch.rand(4), derived)  # derived, not random: a re-run repeats it
