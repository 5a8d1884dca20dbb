"""``benchmarks/quality.py``'s data: the shard rows, the pairs trained and scored on, the
training batch stream, the trivial predictors fitted on the training targets, and
``--export_shards``."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from controlnet_ray.config import DataConfig
from controlnet_ray.data.decode import decode_image, decode_pairs, decode_rgb
from controlnet_ray.data.pairs import make_pairs
from controlnet_ray.judging import TrivialPredictors, fit_trivial_predictors
from controlnet_ray.judging.predictors import pose_bin
from controlnet_ray.judging.session import even_subset
from controlnet_ray.metrics import PSNR_MSE_FLOOR, face_mask

_COLUMNS = ["person_name", "split", "role", "frame_index", "image", "yaw", "pitch", "roll"]


def resolve_shards(args: argparse.Namespace) -> Path:
    """The shard directory: --shards, or the synthetic set rendered and prepared (cached)."""
    if args.shards is not None:
        return args.shards
    from controlnet_ray.data.pools import pool_workers
    from controlnet_ray.data.shards import ensure_shards  # needs insightface: import lazily
    from controlnet_ray.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

    data = DataConfig(
        cache_dir=args.cache_dir,
        image_size=args.image_size,
        pair_mode=args.pair_mode,
        min_pose_distance=args.min_pose_distance,
        max_pose_distance=args.max_pose_distance,
    )
    spec = SyntheticSpec(
        num_identities=args.identities, frames_per_identity=args.frames, seed=args.synthetic_seed
    )
    workers = pool_workers(2)
    data.data_dir = str(ensure_synthetic_dataset(data.resolved_cache_dir(), spec, workers))
    return ensure_shards(data, num_workers=workers)


def read_rows(shards: Path) -> dict[str, np.ndarray]:
    """All shard rows as numpy columns (pyarrow only, so it also works without insightface)."""
    manifest = json.loads((shards / "manifest.json").read_text(encoding="utf-8"))
    files = [
        shards / f for split in ("train", "val", "test") for f in manifest["shards"].get(split, [])
    ]
    if not files:
        raise SystemExit(f"no shard files listed in {shards / 'manifest.json'}")
    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    for f in files:
        table = pq.read_table(f, columns=_COLUMNS)
        for c in _COLUMNS:
            cols[c].extend(table.column(c).to_pylist())
    out = {c: np.asarray(v, dtype=object) for c, v in cols.items()}
    for c in ("yaw", "pitch", "roll"):
        out[c] = out[c].astype(np.float32)
    out["pose"] = np.stack([out["yaw"], out["pitch"], out["roll"]], 1)
    return out


def subset_rows(rows: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[keep] for k, v in rows.items()}


def pairs_of(rows: dict[str, np.ndarray], mode: str, args: argparse.Namespace) -> np.ndarray:
    return make_pairs(
        {k: rows[k] for k in ("person_name", "role", "yaw", "pitch", "roll")},
        mode=mode,
        min_deg=args.min_pose_distance,
        max_deg=args.max_pose_distance,
    )


def pair_batch(rows: dict[str, np.ndarray], idx: np.ndarray, flip: bool) -> dict[str, torch.Tensor]:
    """Decode pairs ``idx`` ([B, 2] row indices) with the pipeline's own decode_pairs."""
    src, tgt = idx[:, 0], idx[:, 1]
    raw = {
        "source": rows["image"][src],
        "target": rows["image"][tgt],
        "source_pose": list(rows["pose"][src]),
        "target_pose": list(rows["pose"][tgt]),
    }
    return {k: torch.from_numpy(v) for k, v in decode_pairs(raw, flip=flip).items()}


def train_batches(
    rows: dict[str, np.ndarray],
    pairs: np.ndarray,
    batch_size: int,
    flip: bool,
    seed: int,
    threads: int,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Endless (epoch, batch) stream: reshuffled every epoch, decoded inline or by threads."""
    rng = np.random.default_rng(seed)

    def index_batches() -> Iterator[tuple[int, np.ndarray]]:
        epoch = 0
        while True:
            order = rng.permutation(len(pairs))
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield epoch, pairs[order[i : i + batch_size]]
            epoch += 1

    if threads <= 0:
        for epoch, idx in index_batches():
            yield epoch, pair_batch(rows, idx, flip)
        return
    with cf.ThreadPoolExecutor(threads) as ex:  # cv2 releases the GIL while decoding
        pending: list[tuple[int, cf.Future]] = []
        for epoch, idx in index_batches():
            pending.append((epoch, ex.submit(pair_batch, rows, idx, flip)))
            if len(pending) > 2 * threads:
                e, fut = pending.pop(0)
                yield e, fut.result()


def trivial_predictors(
    rows: dict[str, np.ndarray], train_pairs_ftv: np.ndarray, mask: torch.Tensor
) -> TrivialPredictors:
    """``controlnet_ray.judging``'s trivial predictors fitted on the training targets (the unique
    frames of the train persons' front_to_video pairs)."""
    frames = np.unique(train_pairs_ftv[:, 1])
    images = decode_rgb(list(rows["image"][frames]))
    return fit_trivial_predictors(images, rows["pose"][frames], mask)


def bin_coverage(trivial: TrivialPredictors, target_pose: np.ndarray) -> float:
    """Share of requested poses whose (yaw, pitch) bin has training frames (else: nearest bin)."""
    hits = [pose_bin(y, p) in trivial.bins.means for y, p, _ in target_pose]
    return float(np.mean(hits)) if hits else 0.0


def export_shards(src: Path, dst: Path, quality: int) -> None:
    """Copy ``src`` to ``dst`` with images re-encoded as JPEG (``quality``) and the columns
    this script reads; the manifest is copied so ``--shards dst`` works like ``--shards src``."""
    import cv2
    import pyarrow as pa

    manifest = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    dst.mkdir(parents=True, exist_ok=True)
    errs = []
    for split in ("train", "val", "test"):
        for name in manifest["shards"].get(split, []):
            table = pq.read_table(src / name, columns=_COLUMNS)
            jpegs = []
            for png in table.column("image").to_pylist():
                bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
                ok, enc = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not ok:
                    raise RuntimeError(f"JPEG encoding failed in {name}")
                back = cv2.imdecode(enc, cv2.IMREAD_COLOR).astype(np.float64)
                errs.append(float(((back - bgr) ** 2).mean()) / 255.0**2)
                jpegs.append(enc.tobytes())
            idx = table.schema.get_field_index("image")
            table = table.set_column(idx, "image", pa.array(jpegs, type=pa.binary()))
            pq.write_table(table, dst / name, compression="none")
    manifest["alignment"] = (
        manifest.get("alignment", "") + f"; re-encoded as JPEG q{quality} "
        "by benchmarks/quality.py --export_shards"
    )
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    size = sum(f.stat().st_size for f in dst.iterdir()) / 2**20
    psnr = float(np.mean(10 * np.log10(1 / np.maximum(errs, PSNR_MSE_FLOOR))))
    print(
        f"exported {len(errs)} images to {dst} ({size:.1f} MiB); JPEG q{quality} vs the PNG "
        f"shards: mean PSNR {psnr:.1f} dB"
    )


@dataclass
class BenchData:
    """The rows, the pairs trained and scored on, and the trivial predictors."""

    shards: Path
    train_rows: dict[str, np.ndarray]
    held_rows: dict[str, np.ndarray]
    train_pairs: np.ndarray
    eval_pairs: np.ndarray  # held-out front_to_video pairs (the final scores)
    subset: np.ndarray  # val persons' pairs among them (the curve during training)
    persons: dict[str, int]
    mask: torch.Tensor
    trivial: TrivialPredictors
    prep: dict[str, float]
    info: dict[str, Any]


def load_data(args: argparse.Namespace, shards: Path, start: tuple[float, float]) -> BenchData:
    rows = read_rows(shards)
    size = decode_image(rows["image"][0]).shape[-1]
    if size != args.image_size:
        raise SystemExit(f"shards in {shards} are {size} px but --image_size is {args.image_size}")
    split = rows["split"]
    train_rows = subset_rows(rows, split == "train")
    held_rows = subset_rows(rows, split != "train")
    train_pairs = pairs_of(train_rows, args.pair_mode, args)
    train_ftv = (
        train_pairs
        if args.pair_mode == "front_to_video"
        else pairs_of(train_rows, "front_to_video", args)
    )
    eval_pairs, subset = held_out_pairs(args, held_rows)
    persons = {s: len(set(rows["person_name"][split == s])) for s in ("train", "val", "test")}
    from controlnet_ray.data.shards.schema import load_manifest

    mask = face_mask(args.image_size, load_manifest(shards).framing)
    trivial = trivial_predictors(train_rows, train_ftv, mask)
    prep = {"wall_s": time.perf_counter() - start[0], "cpu_s": time.process_time() - start[1]}
    data = BenchData(
        shards, train_rows, held_rows, train_pairs, eval_pairs, subset, persons, mask, trivial,
        prep, {},
    )  # fmt: skip
    data.info = data_info(data)
    print_data(args, data)
    return data


def held_out_pairs(
    args: argparse.Namespace, held_rows: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The held-out front_to_video pairs (capped by --eval_max_pairs) and the curve's subset
    of them: --eval_subset pairs of the val persons (all held-out pairs when there are none)."""
    eval_pairs = pairs_of(held_rows, "front_to_video", args)
    rng = np.random.default_rng(args.seed)
    if args.eval_max_pairs is not None:  # the judged report below takes the same subset
        eval_pairs = even_subset(eval_pairs, args.eval_max_pairs)
    val_idx = np.flatnonzero(held_rows["split"][eval_pairs[:, 0]] == "val")
    val_idx = val_idx if len(val_idx) else np.arange(len(eval_pairs))
    subset = eval_pairs[np.sort(rng.choice(val_idx, min(args.eval_subset, len(val_idx)), False))]
    return eval_pairs, subset


def data_info(data: BenchData) -> dict[str, Any]:
    return {
        "shards": str(data.shards),
        "persons": data.persons,
        "train_pairs": int(len(data.train_pairs)),
        "eval_pairs": int(len(data.eval_pairs)),
        "eval_subset_pairs": int(len(data.subset)),
        "trivial_frames": data.trivial.frames,
        "pose_bins": len(data.trivial.bins.means),
        "face_mask_fraction": float(data.mask.float().mean()),
    }


def print_data(args: argparse.Namespace, data: BenchData) -> None:
    print(
        f"data: {data.shards}\n  persons {data.persons}; train pairs ({args.pair_mode}) "
        f"{len(data.train_pairs)}; held-out front_to_video pairs {len(data.eval_pairs)} "
        f"(subset {len(data.subset)} of val persons for the curve); "
        f"prep {data.prep['cpu_s']:.0f} CPU s / {data.prep['wall_s']:.0f} wall s",
        flush=True,
    )
