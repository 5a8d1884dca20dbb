"""The loop's collectives: host-side sums must reach every backend's device.

NCCL (the GPU workers' backend) reduces CUDA tensors only; the epoch and validation sums
are built on the host, so on a GPU run they must go to the rank's GPU for the reduction
(this broke the first real ``--use_gpu`` run: "No backend type associated with device
type cpu").
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from controlnet_ray.loop import collectives


@pytest.fixture
def world_of_one(request: pytest.FixtureRequest):  # noqa: ANN201
    """A real process group of one rank, in this process, on the backend the test names."""
    backend = request.param
    if backend == "nccl" and not torch.cuda.is_available():
        pytest.skip("NCCL needs a CUDA device")
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def test_without_a_process_group_the_sum_is_the_tensor_itself() -> None:
    t = torch.arange(3, dtype=torch.float64)
    assert collectives.all_reduce_sum(t) is t


def test_nccl_takes_host_sums_on_this_ranks_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    t = torch.zeros(4, dtype=torch.float64)
    assert collectives.collective_device(t) == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert collectives.collective_device(t) == torch.device("cpu")


@pytest.mark.parametrize(
    "world_of_one",
    ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)],
    indirect=True,
)
def test_a_host_sum_reduces_on_a_real_group_and_comes_back_to_the_host(world_of_one: str) -> None:
    t = torch.tensor([1.5, 2.0, 0.25, 16.0], dtype=torch.float64)
    out = collectives.all_reduce_sum(t)
    assert out.device == t.device and out.dtype == torch.float64
    assert torch.equal(out, t) and out is not t  # a world of one sums to itself, as a copy
