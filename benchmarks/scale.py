"""The data pipeline at scale: today's index pipeline against the former one, same process.

Synthetic shards (``shards.write_shard_dir``: N small random PNG crops, ``--per_person`` a
person, 70/30 train/val by person, random poses; no alignment, so only the pipeline is
measured) are read by

  former   ``read_parquet -> groupby(person).map_groups(pairing with image bytes) ->
           materialize -> map_batches(decode to float32 NCHW)``, val decoded and
           materialised, a 4x-batch local shuffle buffer (the code before issue 13 item 2,
           kept here as the baseline);
  index    ``controlnet_ray.data.pipeline.build_pair_datasets``: pair index rows ->
           seeded random_shuffle -> look images up by row in the object store -> uint8,
           consumed as delivered (the worker normalises and mirrors on its device,
           ``data.batch.to_model_batch``, whose CPU rate is printed beside it).

For each: build seconds, object-store bytes held after the build (what stays pinned while a
run trains) and the peak while building and iterating (sampled every 50 ms from the raylets'
store statistics), samples/s of the best of ``--epochs`` training passes consumed on the
driver, distinct persons per batch, and the bytes an epoch would move between nodes,
computed from block sizes (an upper bound: every block produced on another node than its
consumer): former = encoded pair blocks read by decode + float32 batches + decoded val;
index = index rows shuffled + uint8 batches + val uint8 + image chunks a node lacks (at most
the image table per node, in the first epoch; then 0 while it stays cached). The former
pipeline's groupby also moves every image once per run (build); both are printed.

    python benchmarks/scale.py [--images 20000] [--image_size 32] [--per_person 16]
                               [--pair_mode front_to_video] [--batch_size 64] [--epochs 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from controlnet_ray.config import PAIR_MODES, DataConfig
from controlnet_ray.data.batch import to_model_batch
from controlnet_ray.data.decode import decode_pairs
from controlnet_ray.data.pairs import make_pairs
from controlnet_ray.data.pipeline import (
    DECODE_CPUS,
    build_pair_datasets,
    index_table,
    pair_kwargs,
    quiet_ray_data,
)
from controlnet_ray.data.shards import read_shard_table, split_files, write_shard_dir

MiB = 1 << 20


# ------------------------------------------------------------------------------ data


def synthetic_rows(n: int, per_person: int, size: int, seed: int = 0) -> list[dict]:
    """``n`` crops of ``n // per_person`` persons. Pixels (0, 0) and (0, W-1) spell the person
    (R + 256 G; both, so mirrored crops read the same), so batches can be counted by
    identity; the rest is smooth noise (PNG-compressible like a face crop, unlike white
    noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    base = rng.integers(0, 256, (64, 4, 4, 3), dtype=np.uint8)
    for i in range(n):
        person = i // per_person
        img = cv2.resize(base[i % 64], (size, size), interpolation=cv2.INTER_LINEAR)
        img = cv2.add(img, rng.integers(0, 8, img.shape, dtype=np.uint8))
        img[0, 0, :2] = img[0, -1, :2] = (person % 256, person // 256)  # mirror-proof
        ok, buf = cv2.imencode(
            ".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]
        )
        assert ok
        k = i % per_person
        rows.append(
            {
                "person_name": f"p{person:06d}",
                "split": "train" if (person * 2654435761) % 100 < 70 else "val",
                "role": "front" if k == 0 else "video",
                "frame_index": k,
                "image_path": f"p{person:06d}/{k}.png",
                "image": buf.tobytes(),
                "keypoints": [0.0] * 15,
                "landmarks": [0.0] * 10,
                "yaw": float(rng.uniform(-70, 70)),
                "pitch": float(rng.uniform(-30, 30)),
                "roll": float(rng.uniform(-20, 20)),
            }
        )
    return rows


# ------------------------------------------------------------------------------ former pipeline


def former_pair_group(group: pd.DataFrame, mode: str, min_deg: float, max_deg: float):
    """The former map_groups function: one person's pairs, each row holding both PNGs."""
    group = group.sort_values(["role", "frame_index"], kind="stable").reset_index(drop=True)
    idx = make_pairs(group, mode=mode, min_deg=min_deg, max_deg=max_deg)
    poses = group[["yaw", "pitch", "roll"]].to_numpy(np.float32)
    images = group["image"].to_numpy()
    src, tgt = idx[:, 0], idx[:, 1]
    return pd.DataFrame(
        {
            "source": list(images[src]),
            "target": list(images[tgt]),
            "source_pose": list(poses[src]),
            "target_pose": list(poses[tgt]),
        }
    )


def former_decode(batch: dict, flip: bool) -> dict:
    return decode_pairs(batch, flip=flip)


def build_former(shards: Path, cfg: DataConfig):
    """The pipeline before issue 13 item 2 (see the module docstring)."""
    import ray.data

    def pairs(split: str):
        files = [str(f) for f in split_files(shards, split)]
        cols = ["person_name", "role", "frame_index", "image", "yaw", "pitch", "roll"]
        return (
            ray.data.read_parquet(files)
            .select_columns(cols)
            .groupby("person_name", num_partitions=len(files))
            .map_groups(former_pair_group, fn_kwargs=pair_kwargs(cfg), batch_format="pandas")
            .materialize()
        )

    train_pairs, val_pairs = pairs("train"), pairs("val")
    kw = {"batch_size": max(1, min(cfg.batch_size, 64)), "batch_format": "numpy"}
    train = train_pairs.randomize_block_order().map_batches(
        former_decode, fn_kwargs={"flip": True}, num_cpus=DECODE_CPUS, **kw
    )
    val = val_pairs.map_batches(
        former_decode, fn_kwargs={"flip": False}, num_cpus=DECODE_CPUS, **kw
    ).materialize()
    return train, val, train_pairs, val


# ------------------------------------------------------------------------------ measuring


def store_used_bytes() -> int:
    """Object-store (plasma) bytes in use over the cluster, from the raylets' store statistics
    as ``ray memory --stats-only`` prints them (``memory_summary(stats_only=True)``).

    A private API on purpose: Ray 2.60 has no public one that gives this figure.
    ``ray.util.state.summarize_objects`` / ``list_objects`` add up the sizes of live object
    *references*, once per process holding one (measured: one 20 MiB object held by the
    driver and two actors is 60 MB there, 20 MiB in the store; small objects inlined outside
    the store count, copies pulled to other nodes do not), are capped at a listing limit, and
    need the dashboard, which this benchmark does not start;
    ``ray.available_resources()["object_store_memory"]`` moves with use but is not it (measured:
    down 30 MiB with 40 MiB in the store); the ``ray_object_store_memory`` metric needs
    Prometheus metrics collection, switched off here as in local runs. So it is imported and
    parsed under a guard:
    when Ray moves or rewords it, the benchmark stops with one line saying so instead of
    reporting 0 bytes."""
    try:
        from ray._private.internal_api import memory_summary
    except ImportError as exc:
        raise SystemExit(_store_stats_changed(f"cannot import memory_summary ({exc})")) from exc
    import ray

    # This cluster's address: without it memory_summary guesses from /tmp/ray and fails when
    # another Ray runs on the machine.
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.findall(r"Plasma memory usage ([\d.]+) (\w+)", text)
    units = {"B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30}
    if not found or any(unit not in units for _, unit in found):
        raise SystemExit(_store_stats_changed(f"no 'Plasma memory usage N MiB' line in {text!r}"))
    return int(sum(float(value) * units[unit] for value, unit in found))


def _store_stats_changed(what: str) -> str:
    import ray

    return (
        f"scale.py: Ray {ray.__version__}'s private store statistics changed: {what}; "
        "update store_used_bytes (benchmarks/scale.py)"
    )


class PeakSampler:
    """Peak of :func:`store_used_bytes` while the ``with`` block runs (50 ms samples)."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = store_used_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, store_used_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, store_used_bytes())


def persons_of(images: torch.Tensor) -> set[int]:
    """Person ids spelled by pixel (0, 0): uint8 [B, H, W, 3] or [B, 3, H, W] in [-1, 1]."""
    if images.dtype == torch.uint8:
        px = images[:, 0, 0, :2].to(torch.int64)
    else:
        px = torch.round((images[:, :2, 0, 0] + 1) * 127.5).to(torch.int64)
    return set((px[:, 0] + 256 * px[:, 1]).tolist())


def normalise_rate(ds, bs: int, repeats: int = 50) -> float:
    """samples/s of ``to_model_batch(flip=True)`` on this CPU (a GPU does it in microseconds):
    the work the former pipeline did in its decode tasks and the index pipeline leaves to
    the worker's device."""
    batch = next(iter(ds.iter_torch_batches(batch_size=bs, dtypes=None)))
    t0 = time.perf_counter()
    for _ in range(repeats):
        to_model_batch(batch, flip=True)
    return repeats * len(batch["source"]) / (time.perf_counter() - t0)


def consume(batches, bs: int) -> tuple[float, float, int, float]:
    """(samples/s, seconds to the first batch, bytes delivered, mean distinct persons per
    full batch) of one pass. The rate counts the whole pass, first batch included."""
    n, nbytes, persons, t0, first = 0, 0, [], time.perf_counter(), None
    for raw, batch in batches:
        first = first if first is not None else time.perf_counter() - t0
        nbytes += sum(v.numel() * v.element_size() for v in raw.values())
        n += len(batch["source"])
        if len(batch["source"]) == bs:
            persons.append(len(persons_of(batch["source"])))
    mixed = float(np.mean(persons)) if persons else 0.0
    return n / (time.perf_counter() - t0), first or 0.0, nbytes, mixed


def former_batches(ds, bs: int):
    for b in ds.iter_torch_batches(
        batch_size=bs, local_shuffle_buffer_size=4 * bs, dtypes=torch.float32
    ):
        yield b, b


def index_batches(ds, bs: int):
    """As delivered to a worker (uint8); normalising is the device's job (normalise_rate)."""
    for b in ds.iter_torch_batches(batch_size=bs, dtypes=None):
        yield b, b


def dataset_bytes(ds) -> int:
    return int(ds.size_bytes())


# ------------------------------------------------------------------------------ main


def run(args: argparse.Namespace, shards: Path) -> None:
    import ray

    cfg = DataConfig(batch_size=args.batch_size, pair_mode=args.pair_mode, image_size=args.size)
    table_bytes = sum(
        len(b) for b in read_shard_table(shards, columns=["image"])["image"].to_pylist()
    )
    n_train = len(index_table(shards, "train", cfg))
    n_val = len(index_table(shards, "val", cfg))
    img_u8 = 3 * args.size * args.size
    print(
        f"{args.images} images of {args.size} px ({table_bytes / MiB:.1f} MiB of PNG), "
        f"{args.per_person} a person; {n_train} train / {n_val} val pairs ({args.pair_mode}); "
        f"batch {args.batch_size}; {os.cpu_count()} CPUs"
    )
    rows = []
    for name in ("former", "index"):
        gc.collect()
        base = store_used_bytes()
        with PeakSampler() as peak:
            t0 = time.perf_counter()
            if name == "former":
                train, val, train_pairs, val_held = build_former(shards, cfg)
                per_epoch_in = dataset_bytes(train_pairs) + dataset_bytes(val_held)
                per_run = table_bytes  # the groupby hash-shuffles every image once
            else:
                pairs = build_pair_datasets(shards, cfg, seed=0)
                train, val = pairs.train, pairs.val
                index_bytes = 40 * (n_train + n_val)
                per_epoch_in = index_bytes + table_bytes  # image chunks: first epoch, bound
                per_run = 0
            build_s = time.perf_counter() - t0
            held = store_used_bytes() - base
            rates, firsts = [], []
            for _ in range(args.epochs):
                make = former_batches if name == "former" else index_batches
                rate, first, delivered, mixed = consume(
                    make(train, args.batch_size), args.batch_size
                )
                rates.append(rate)
                firsts.append(first)
            val_bytes = sum(
                v.numel() * v.element_size()
                for b in val.iter_torch_batches(batch_size=args.batch_size, dtypes=None)
                for v in b.values()
            )
            if name == "index":
                print(
                    f"  to_model_batch on 1 CPU: {normalise_rate(train, args.batch_size):.0f} "
                    "samples/s (on the worker's device in training)"
                )
        moved = per_epoch_in + delivered + val_bytes
        rows.append(
            (name, build_s, held, peak.peak - base, max(rates), mixed, moved, per_run, delivered)
        )
        print(
            f"{name:7s} build {build_s:6.1f} s  store held {held / MiB:8.1f} MiB  "
            f"peak {(peak.peak - base) / MiB:8.1f} MiB  {max(rates):8.0f} samples/s "
            f"(epochs {', '.join(f'{r:.0f}' for r in rates)}; first batch after "
            f"{', '.join(f'{t:.2f}' for t in firsts)} s)  {mixed:4.1f} persons/batch  "
            f"moves/epoch <= {moved / MiB:8.1f} MiB (to workers {delivered / MiB:.1f})  "
            f"+ per run {per_run / MiB:.1f} MiB",
            flush=True,
        )
        del train, val
        if name == "former":
            del train_pairs, val_held
        else:
            del pairs
        gc.collect()
        time.sleep(1.0)  # let the store release what the dropped datasets held
    (_, fb, fh, fp, fr, fm, fmv, _, _), (_, ib, ih, ip, ir, im, imv, _, _) = rows
    print(
        f"index / former: store held {ih / max(fh, 1):.2f}x, peak {ip / max(fp, 1):.2f}x, "
        f"samples/s {ir / fr:.2f}x, bytes moved per epoch {imv / fmv:.2f}x, "
        f"persons per batch {im:.1f} vs {fm:.1f} (uint8 per sample {2 * img_u8} B vs "
        f"{8 * img_u8} B float32)"
    )
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--image_size", dest="size", type=int, default=32)
    p.add_argument("--per_person", type=int, default=16)
    p.add_argument("--pair_mode", default=DataConfig.pair_mode, choices=PAIR_MODES)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--shards", type=Path, default=None, help="keep the synthetic shards here")
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    os.environ.setdefault("RAY_enable_metrics_collection", "false")
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or Path(tmp) / "shards"
        if not (shards / "manifest.json").is_file():
            t0 = time.perf_counter()
            rows = synthetic_rows(args.images, args.per_person, args.size)
            write_shard_dir(
                shards,
                rows,
                args.size,
                (args.pair_mode, DataConfig.min_pose_distance, DataConfig.max_pose_distance),
            )
            del rows
            print(f"wrote synthetic shards in {time.perf_counter() - t0:.1f} s")
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        quiet_ray_data()
        run(args, shards)


if __name__ == "__main__":
    main()
