"""Steady-state samples/s of the full Ray path against the engine's plain loop, same data.

Measurements in one process, on the embedded dataset's shards:
  plain   the engine's ``train_micro_batch`` over pre-decoded batches, 1 torch thread
          (compute only: an upper bound for any data path); best of rounds taken before and
          after the Ray runs, so a slow spell on a shared machine cannot flatter Ray;
  plain*2 two plain loops in two processes at once: what this machine itself allows two
          workers (memory bandwidth, shared cores), with no Ray, no DDP, no data path;
  ray-1   ``python -m controlnet_ray.train``'s path: TorchTrainer, Ray Data streaming decode,
          1 worker with 1 torch thread;
  ray-2   the same with 2 DDP workers (gloo), 1 torch thread each.
Prints the rates and the ratios ray-1 / plain (target >= 0.9) and ray-2 / ray-1 (target >= 1.7).
Steady state = the best epoch after the first (which pays for worker start-up); Ray's rates
are over each epoch's training pass (validation excluded, as in the plain loop).

    python benchmarks/ray_overhead.py [--epochs 5] [--batch_size 16] [--image_size 112]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import torch

from controlnet_ray.config import DataConfig, TrainConfig
from controlnet_ray.data.decode import decode_pairs
from controlnet_ray.data.pipeline import encoded_pairs
from controlnet_ray.data.shards import split_files
from controlnet_ray.engine import TrainEngine, build_optimizer, build_scheduler, resolve_amp
from controlnet_ray.launcher import resolve_shards, run_training
from controlnet_ray.model import apply_freezing, build_model


def plain_batches(shards: Path, cfg: TrainConfig, limit: int) -> list[dict[str, torch.Tensor]]:
    """Pre-decoded training batches, so the plain loop measures the engine alone."""
    rows = encoded_pairs(shards, "train", cfg.data)
    bs = cfg.data.batch_size
    out = []
    for i in range(0, min(len(rows["source"]), limit * bs) - bs + 1, bs):
        chunk = {k: v[i : i + bs] for k, v in rows.items()}
        decoded = decode_pairs(chunk, flip=True)
        out.append({k: torch.from_numpy(v) for k, v in decoded.items()})
    return out


def plain_rate(cfg: TrainConfig, batches: list[dict[str, torch.Tensor]], rounds: int) -> float:
    torch.set_num_threads(1)
    model = build_model(cfg.model)
    apply_freezing(model, cfg.model)
    device = torch.device("cpu")
    opt = build_optimizer(model, cfg.optim)
    engine = TrainEngine(
        model,
        opt,
        build_scheduler(opt, cfg.optim, len(batches)),
        cfg.optim,
        device,
        resolve_amp(False, device),
    )
    best = 0.0
    for _ in range(rounds):
        t0, n = time.perf_counter(), 0
        for b in batches:
            n += engine.train_micro_batch(b).batch_size
        best = max(best, n / (time.perf_counter() - t0))
    return best


def _plain_in_child(cfg_dict: dict, shards: str, limit: int, rounds: int, start, out) -> None:
    cfg = TrainConfig.from_dict(cfg_dict)
    batches = plain_batches(Path(shards), cfg, limit)
    start.wait()  # both children measure at the same time
    out.put(plain_rate(cfg, batches, rounds))


def parallel_plain_rate(cfg: TrainConfig, shards: Path, limit: int, procs: int = 2) -> float:
    """Summed rate of ``procs`` plain loops running at once in separate processes."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs), ctx.Queue()
    children = [
        ctx.Process(target=_plain_in_child, args=(cfg.to_dict(), str(shards), limit, 2, start, out))
        for _ in range(procs)
    ]
    for c in children:
        c.start()
    rates = [out.get(timeout=900) for _ in children]
    for c in children:
        c.join()
    return sum(rates)


def ray_rate(cfg: TrainConfig, workers: int, root: Path) -> float:
    run_cfg = dataclasses.replace(
        cfg,
        output=dataclasses.replace(
            cfg.output, save_dir=str(root / f"w{workers}"), log_dir=str(root / f"w{workers}_logs")
        ),
        ray=dataclasses.replace(cfg.ray, num_ray_workers=workers, run_name=f"overhead_w{workers}"),
    )
    run_training(run_cfg)
    history = json.loads((root / f"w{workers}" / "training_history.json").read_text())
    rates = [h["samples_per_sec"] for h in history["train"][1:]]
    return max(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--image_size", type=int, default=DataConfig.image_size)
    p.add_argument("--plain_batches", type=int, default=30, help="batches per plain round")
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    cfg = TrainConfig()
    cfg.data.batch_size = args.batch_size
    cfg.data.image_size = cfg.model.image_size = args.image_size
    cfg.optim.epochs = args.epochs
    cfg.output.save_interval = args.epochs
    cfg.output.progress = "lines"
    shards = resolve_shards(cfg)
    batches = plain_batches(shards, cfg, limit=args.plain_batches)
    plain = plain_rate(cfg, batches, rounds=3)
    pair = parallel_plain_rate(cfg, shards, limit=args.plain_batches)
    with tempfile.TemporaryDirectory() as tmp:
        ray1 = ray_rate(cfg, 1, Path(tmp))
        ray2 = ray_rate(cfg, 2, Path(tmp))
    plain = max(plain, plain_rate(cfg, batches, rounds=2))
    print(
        f"\n{os.cpu_count()} CPUs, batch {args.batch_size}, {args.image_size} px, "
        f"{len(split_files(shards, 'train'))} train shard(s)"
    )
    print(f"plain engine loop (1 thread)  : {plain:7.1f} samples/s")
    print(
        f"2 plain loops at once (no Ray): {pair:7.1f} samples/s   ratio to plain "
        f"{pair / plain:.2f} (what the machine allows two workers)"
    )
    print(
        f"Ray path, 1 worker (1 thread) : {ray1:7.1f} samples/s   ratio to plain {ray1 / plain:.2f}"
        " (target >= 0.9)"
    )
    print(
        f"Ray path, 2 workers (1 each)  : {ray2:7.1f} samples/s   ratio to 1 worker "
        f"{ray2 / ray1:.2f} (target >= 1.7); to 2 plain loops {ray2 / pair:.2f}"
    )


if __name__ == "__main__":
    main()
