"""Decoded samples/s: the Ray Data pipeline against a plain PyTorch DataLoader, same shards.

Both read the same Parquet shards and pair index and decode the same PNG crops to normalised
float tensors of the training batch layout (Ray Data delivers uint8, normalised and mirrored
by ``data.batch.to_model_batch`` as the worker does). Prints both rates and their ratio.

    python benchmarks/data_pipeline.py [--shards DIR] [--epochs 3] [--batch_size 16]

Without --shards it prepares the embedded synthetic dataset (cached).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from controlnet_ray.config import PAIR_MODES, DataConfig
from controlnet_ray.data.batch import to_model_batch
from controlnet_ray.data.decode import decode_pairs
from controlnet_ray.data.pipeline import build_pair_datasets, encoded_pairs


class PairTable(torch.utils.data.Dataset):
    """Plain-PyTorch baseline: all pairs of the train split in memory, decoded per item."""

    def __init__(self, shards: Path, cfg: DataConfig) -> None:
        self.pairs = encoded_pairs(shards, "train", cfg)

    def __len__(self) -> int:
        return len(self.pairs["source"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = {k: v[i : i + 1] for k, v in self.pairs.items()}
        out = decode_pairs(batch, flip=True)
        return {k: torch.from_numpy(v[0]) for k, v in out.items()}


def time_loader(batches, limit: int | None = None) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(batches):
        n += len(batch["source"])
        if limit and i + 1 >= limit:
            break
    return n, time.perf_counter() - t0


def _model_batches(batches, device: torch.device | None):  # noqa: ANN001, ANN202
    """The worker's conversion of each batch; on CUDA the last one is waited for, so a timer
    around the iteration counts the device's work too."""
    for b in batches:
        yield to_model_batch(b, flip=True)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def ray_pipeline_rates(
    shards: Path, cfg: DataConfig, epochs: int, device: torch.device | None = None
) -> tuple[list[float], int]:
    """Samples/s of each epoch of the Ray Data training pipeline consumed alone, as a worker
    does (uint8 batches to ``device``, normalised and mirrored there), and pairs per epoch.

    Starts a local Ray with all of this machine's CPUs and shuts it down afterwards.
    """
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        pairs = build_pair_datasets(shards, cfg)
        rates = []
        for _ in range(epochs):
            where = {} if device is None else {"device": device}  # Ray's default otherwise
            it = pairs.train.iter_torch_batches(batch_size=cfg.batch_size, dtypes=None, **where)
            n, dt = time_loader(_model_batches(it, device))
            rates.append(n / dt)
        return rates, pairs.num_train_pairs
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--loader_workers", type=int, default=1)
    p.add_argument(
        "--pair_mode",
        default="any",
        choices=PAIR_MODES,
        help="'any' (default) gives ~12x the pairs of the training default, so that an epoch "
        "lasts seconds and per-epoch start-up does not dominate the rate",
    )
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    cfg = DataConfig(batch_size=args.batch_size, pair_mode=args.pair_mode)
    shards = args.shards
    if shards is None:
        from controlnet_ray.config import TrainConfig
        from controlnet_ray.launcher import resolve_shards

        shards = resolve_shards(TrainConfig(data=cfg))
    ray_rates, num_pairs = ray_pipeline_rates(shards, cfg, args.epochs)
    table = PairTable(shards, cfg)
    loader = torch.utils.data.DataLoader(
        table,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.loader_workers,
        persistent_workers=args.loader_workers > 0,
    )
    torch_rates = []
    for _ in range(args.epochs):
        n, dt = time_loader(loader)
        torch_rates.append(n / dt)
    ray_best, torch_best = max(ray_rates), max(torch_rates)
    print(f"pairs per epoch: {num_pairs}, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(
        f"Ray Data pipeline   : {ray_best:8.1f} samples/s  (epochs: "
        f"{', '.join(f'{r:.0f}' for r in ray_rates)})"
    )
    print(
        f"torch DataLoader({args.loader_workers}) : {torch_best:8.1f} samples/s  (epochs: "
        f"{', '.join(f'{r:.0f}' for r in torch_rates)})"
    )
    print(f"ratio Ray / DataLoader: {ray_best / torch_best:.2f}")


if __name__ == "__main__":
    main()
