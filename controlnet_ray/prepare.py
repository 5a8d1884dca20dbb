"""``python -m controlnet_ray.prepare``: legacy data directory -> aligned Parquet shards.

Training prepares (and caches) shards by itself when given ``--data_dir``; this CLI is for
preparing them ahead of time, e.g. once on a machine with many cores, and for inspecting the
manifest. Without ``--out`` it prepares into the cache that training reads (``--cache_dir``),
so a later run reuses the shards. ``--address`` connects to a Ray cluster and spreads the
decoding and alignment over its nodes (every node must see the images at the same paths);
training's own first-use preparation runs before the launcher connects to Ray, so on a
cluster prepare ahead with this command. Exit status 2 on a data error, with the message
naming file, entry and field.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from controlnet_ray.config import FRAMINGS, PAIR_MODES
from controlnet_ray.data.layout import DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m controlnet_ray.prepare",
        description="Turn the original layout (front/video metadata + keypoints + images) into "
        "aligned-face Parquet shards with a manifest.",
    )
    p.add_argument("--data_dir", required=True, help="folder with front_metadata.json etc.")
    p.add_argument(
        "--image_dir",
        default=None,
        help="root the metadata's relative image paths hang from (default: found upwards "
        "from --data_dir, e.g. the folder containing train/)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="shard directory to create or replace (default: the training cache under "
        "--cache_dir, reused by runs with the same data and settings)",
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="training's cache root, without --out (default ~/.cache/controlnet_ray)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to spread decoding and alignment over ('auto' or host:port)",
    )
    p.add_argument("--image_size", type=int, default=112, help="aligned crop size (px)")
    p.add_argument(
        "--num_workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="decode/align processes (1: inline)",
    )
    p.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="skip missing/corrupt images (recorded in the manifest) instead of failing",
    )
    p.add_argument(
        "--split_ratios",
        type=float,
        nargs=3,
        default=(0.7, 0.15, 0.15),
        metavar=("TRAIN", "VAL", "TEST"),
        help="person-level split ratios",
    )
    p.add_argument("--pair_mode", choices=PAIR_MODES, default="front_to_video")
    p.add_argument("--min_pose_distance", type=float, default=5.0)
    p.add_argument("--max_pose_distance", type=float, default=90.0)
    p.add_argument(
        "--framing",
        choices=FRAMINGS,
        default="head",
        help="head: centred on the fitted 3D head (the warp generator's); arcface: 5-point",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from controlnet_ray.data.shards import load_manifest, prepare_shards

    if args.address:
        import ray

        ray.init(address=args.address, log_to_driver=False)
    try:
        if args.out is None:
            manifest = load_manifest(_into_cache(args))
        else:
            manifest = prepare_shards(
                args.data_dir,
                args.out,
                image_dir=args.image_dir,
                image_size=args.image_size,
                num_workers=args.num_workers,
                skip_bad_images=args.skip_bad_images,
                split_ratios=tuple(args.split_ratios),
                pair_mode=args.pair_mode,
                min_pose_distance=args.min_pose_distance,
                max_pose_distance=args.max_pose_distance,
                framing=args.framing,
            )
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = manifest.counts
    per_split = ", ".join(f"{s} {counts[s]['images']}" for s in ("train", "val", "test"))
    print(f"done: {counts['total']['images']} images ({per_split}); pairs {manifest.pairs}")
    return 0


def _into_cache(args: argparse.Namespace):
    """Prepare (or find) the shards where training looks for them: ``ensure_shards``."""
    from controlnet_ray.config import DataConfig
    from controlnet_ray.data.shards import ensure_shards

    cfg = DataConfig(
        data_dir=args.data_dir,
        image_dir=args.image_dir,
        image_size=args.image_size,
        skip_bad_images=args.skip_bad_images,
        split_ratios=tuple(args.split_ratios),
        pair_mode=args.pair_mode,
        min_pose_distance=args.min_pose_distance,
        max_pose_distance=args.max_pose_distance,
        framing=args.framing,
        cache_dir=args.cache_dir,
    )
    return ensure_shards(cfg, num_workers=args.num_workers)


if __name__ == "__main__":
    sys.exit(main())
