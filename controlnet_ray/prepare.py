"""``python -m controlnet_ray.prepare``: legacy data directory -> aligned Parquet shards.

Training prepares (and caches) shards by itself when given ``--data_dir``; this CLI is for
preparing them ahead of time, e.g. once on a machine with many cores, and for inspecting the
manifest. Without ``--out`` it prepares into the cache that training reads (``--cache_dir``),
so a later run reuses the shards. ``--address`` connects to a Ray cluster and spreads the
decoding and alignment over its nodes (every node must see the images at the same paths);
a training run against a cluster does the same for its own first-use preparation, after
connecting. Exit status 2 on a data error, with the message naming file, entry and field.

The data flags are the training CLI's, generated from :class:`~controlnet_ray.config.DataConfig`
(same names, types, defaults, choices and checks); the shards are prepared from that one
DataConfig, as training prepares them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from controlnet_ray.cli import add_flags, section_from_namespace
from controlnet_ray.config import ConfigError, DataConfig
from controlnet_ray.data.layout import DataError

#: Help where the flag means something narrower here than in training (defaults are the
#: config's either way).
HELP = {
    "data_dir": "folder with front_metadata.json etc. (the original layout)",
    "num_workers": "decode/align processes, at most the machine's cores (1: inline)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m controlnet_ray.prepare",
        description="Turn the original layout (front/video metadata + keypoints + images) into "
        "aligned-face Parquet shards with a manifest.",
    )
    add_flags(p, "data", ["data_dir", "image_dir"], help=HELP, required=["data_dir"])
    p.add_argument(
        "--out",
        default=None,
        help="shard directory to create or replace (default: the training cache under "
        "--cache_dir, reused by runs with the same data and settings)",
    )
    add_flags(p, "data", ["cache_dir"])
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to spread decoding and alignment over ('auto' or host:port)",
    )
    data_flags = ["image_size", "num_workers", "skip_bad_images", "split_ratios"]
    data_flags += ["pair_mode", "min_pose_distance", "max_pose_distance", "framing"]
    add_flags(p, "data", data_flags, help=HELP)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[DataConfig, argparse.Namespace]:
    """The data settings (checked: exit status 2 naming the flag) and the prepare-only flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return section_from_namespace(args, "data"), args
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    data, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from controlnet_ray.data.shards import ensure_shards, load_manifest, prepare_shards

    if args.address:
        import ray

        ray.init(address=args.address, log_to_driver=False)
    try:
        if args.out is None:  # where training looks for them
            manifest = load_manifest(ensure_shards(data))
        else:
            manifest = prepare_shards(data, args.out)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = manifest.counts
    per_split = ", ".join(f"{s} {counts[s]['images']}" for s in ("train", "val", "test"))
    print(f"done: {counts['total']['images']} images ({per_split}); pairs {manifest.pairs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
