"""Held-out image quality of ImageControlNet against trivial predictors, for a fixed budget.

Trains the model (pure PyTorch: ``TrainEngine``; no Ray anywhere in the import chain) on the
embedded synthetic dataset for a fixed *training* budget, then scores it on the held-out
identities (the val + test split persons, front photo -> video frame pairs, i.e. the product's
use) together with three trivial predictors:

* ``source``    output = the source (front) image;
* ``mean``      output = the mean training target (mean of the train persons' video frames that
                are targets of front_to_video pairs);
* ``pose_bin``  output = the mean of those training targets in the same pose bin
                (10 deg yaw x 10 deg pitch of the target pose; the global mean for empty bins).

Metrics: PSNR per image = 10 log10(1 / MSE) on [0, 1], averaged over images, on the whole crop
and on the face region: a fixed ellipse of the aligned crop derived from the ArcFace 112-px
template (eyes at y~52, nose 72, mouth 92, eye centres 35 px apart): centre (56, 68),
semi-axes (38, 50) at 112 px, scaled by image_size / 112, pixel centres at (i + 0.5); for the
face region the MSE is taken over the ellipse pixels only.  The margin is model minus the best
trivial predictor, per region.

Budget clock: CPU time of this process (``time.process_time()``, all threads) on CPU, wall time
on CUDA (CPU time means nothing there).  It counts training only (data decoding, forward,
backward, optimiser); the periodic and final evaluations are paused out of it and reported
separately.  The learning rate follows the budget: linear warm-up over ``--warmup_frac`` of it,
then cosine to 1 % (``controlnet_ray.engine.lr_factor`` on the budget fraction).  On CPU,
``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads (unless already set): on a shared machine
OpenMP's spinning threads otherwise burn 2-5x the CPU time for the same work.

    python benchmarks/quality.py                              # 20 CPU-min, 400 identities, 112 px
    python benchmarks/quality.py --budget_min 5 --image_size 64 --json out.json
    python benchmarks/quality.py --device cuda --budget_min 5 --shards prepared_shards/

Data: rendered once and cached under $CONTROLNET_RAY_CACHE (or --cache_dir), then prepared into
Parquet shards (alignment + pose estimation) by ``controlnet_ray.data.shards.ensure_shards``.
``--shards DIR`` uses an already prepared shard directory instead (needs neither the renderer
nor insightface; for machines without them).  The script fails if anything imported Ray.

This file is the entry point and its flags; the work is in ``quality_lib.py`` beside it (and
its parts ``quality_data``, ``quality_scores``, ``quality_training``, ``quality_report``), loaded
by :func:`main` once the script has set the environment (importing any of them changes nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for add in (_training_flags, _model_flags, _device_flags, _eval_flags, _output_flags):
        add(p)
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.image_size % 16:
        p.error(f"--image_size must be divisible by 16, got {args.image_size}")
    return args


def _training_flags(p: argparse.ArgumentParser) -> None:
    """Budget, data and optimiser (choices from ``controlnet_ray.config``: Ray- and torch-free)."""
    from controlnet_ray.config import PAIR_MODES, DataConfig

    p.add_argument(
        "--budget_min",
        type=float,
        default=20.0,
        help="training budget in minutes: CPU time on CPU, wall time on CUDA",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="a budget of optimizer steps instead of --budget_min: repeatable runs (the "
        "schedule and the curve follow the steps; time is still reported)",
    )
    p.add_argument("--identities", type=int, default=400, help="synthetic identities (all splits)")
    p.add_argument("--frames", type=int, default=24, help="video frames per identity")
    p.add_argument("--synthetic_seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=DataConfig.image_size)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=1e-5)
    p.add_argument("--warmup_frac", type=float, default=0.03, help="warm-up share of the budget")
    p.add_argument(
        "--pair_mode",
        choices=PAIR_MODES,
        default=DataConfig.pair_mode,
        help="training pairs (evaluation is always front_to_video)",
    )
    p.add_argument("--min_pose_distance", type=float, default=DataConfig.min_pose_distance)
    p.add_argument("--max_pose_distance", type=float, default=DataConfig.max_pose_distance)


def _model_flags(p: argparse.ArgumentParser) -> None:
    """Loss and model size (the encoder is always the small cnn)."""
    from controlnet_ray.config import LOSS_TYPES

    p.add_argument("--loss_type", choices=LOSS_TYPES, default="mse")
    p.add_argument("--pose_loss_weight", type=float, default=0.1)
    p.add_argument("--base_channels", type=int, default=32)
    p.add_argument("--feature_dim", type=int, default=512)
    p.add_argument("--num_control_layers", type=int, default=3)
    p.add_argument(
        "--no_flip",
        dest="flip",
        action="store_false",
        help="no mirror augmentation of training pairs (default: random mirrors)",
    )


def _device_flags(p: argparse.ArgumentParser) -> None:
    """Where and how fast it runs."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--use_amp", action="store_true", help="bf16 autocast (see engine.resolve_amp)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument(
        "--loader_threads",
        type=int,
        default=None,
        help="decode threads (default 0 = inline on CPU, 8 on CUDA)",
    )


def _eval_flags(p: argparse.ArgumentParser) -> None:
    """The curve during training and the final scores."""
    p.add_argument(
        "--eval_every",
        type=float,
        default=None,
        help="budget units (seconds, or steps with --steps) between subset evaluations "
        "(default budget / 20)",
    )
    p.add_argument(
        "--eval_subset",
        type=int,
        default=384,
        help="held-out pairs (val persons) scored during training",
    )
    p.add_argument(
        "--eval_max_pairs",
        type=int,
        default=None,
        help="cap on held-out pairs in the final evaluation (default: all)",
    )
    p.add_argument("--eval_batch_size", type=int, default=64)


def _output_flags(p: argparse.ArgumentParser) -> None:
    """Data locations, outputs, seed."""
    p.add_argument("--cache_dir", default=None, help="default $CONTROLNET_RAY_CACHE or ~/.cache")
    p.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="use this prepared shard directory (skips rendering and preparation)",
    )
    p.add_argument(
        "--export_shards",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a compact copy of the shards (JPEG images, only the columns used "
        "here) to DIR for a machine without the renderer/insightface, then exit",
    )
    p.add_argument("--export_jpeg_quality", type=int, default=95)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write all figures here")
    p.add_argument(
        "--samples",
        type=Path,
        default=None,
        metavar="PNG",
        help="write a grid of held-out samples (source | target | pose-bin | model)",
    )
    p.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Train for the budget, score, print, and return every figure (what ``--json`` gets)."""
    args = parse_args(argv)
    import quality_lib  # benchmarks/: torch and the package load here, after the environment

    return quality_lib.run(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/OpenMP load; see above
    sys.path.insert(0, str(REPO))  # run from a checkout
    main()
