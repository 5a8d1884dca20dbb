"""``python -m controlnet_ray.evaluate``: score a checkpoint on a split of a dataset.

Example::

    python -m controlnet_ray.evaluate --checkpoint best_model.pth \\
        --data_dir train/datas/file --split test --out report.json [--arcface w600k_r50.onnx]

The data directory is in the original layout; shards are prepared (or reused) with
``data.shards.ensure_shards`` at the checkpoint's image size and **with the checkpoint's split
ratios**, so ``test`` holds the same persons it held during training.  Pairs are made like
training's (``data.pairs.make_pairs`` with the checkpoint's pair mode and pose-distance range,
overridable).

Per pair it scores the model's output and two trivial baselines -- ``source`` (output = the
source image: what a model that ignores the pose would get) and ``mean_target`` (output = the
pixel mean of the training split's target images) -- with PSNR, SSIM (``controlnet_ray.metrics``),
the absolute pose error in degrees measured by the model's own pose head (a learned estimator:
it can share the generator's biases, so read it as a consistency check), and, with
``--arcface``, the ArcFace cosine to the target.  It writes a strict JSON report (no NaN), a
comparison grid PNG (rows: source / target / output) and prints a table, including PSNR by
10-degree target-yaw bin.  Exit status 2 on bad input.

The report's ``judged`` section (skipped with ``--no_judges``) is ``controlnet_ray.judging``'s:
the same pairs judged by judges the model never trained against -- a frozen pose judge (trained
on the train split's real crops, cached per dataset under the cache dir), identity retrieval
among the split's persons, face-region PSNR and sharpness -- for the model and the trivial
predictors (source, mean, pose-bin mean with mirrors, colour-shifted pose-bin mean), with the
headline figures (judged yaw/pitch error over the judge's floor, face PSNR margin over the best
pose-bin mean, identity top-1, sharpness).  The same module scores the benchmarks.

A split of fewer than 3 persons (``data.pairs.MIN_SPLIT_PERSONS``; with few persons in the
data, training's split cannot give each held-out split that many) is judged, but the table's
first line and the judged headline say ``WARNING: judged on N person(s) only`` and the JSON
carries it (``warning``, ``judged.headline.warning``).  A warning rather than a refusal: the
figures are still true of those persons, and a user may want exactly them; what they are not
is a measure of new faces, and the headline says so where it is read.

The scoring lives in ``controlnet_ray.judging.checkpoint_report`` (and ``judging.arcface``);
this module is the command: its flags, their checks before torch is imported, and the run
that writes the report and grid and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from controlnet_ray.cli import add_flags, section_from_namespace
from controlnet_ray.config import DEVICE_CHOICES, ConfigError
from controlnet_ray.data.detect import DetectorError
from controlnet_ray.data.layout import DataError
from controlnet_ray.inference import InferenceError, check_output_path, run_cli

SPLITS = ("train", "val", "test")

#: Help where the flag means something narrower here than in training (defaults are the
#: config's; the pairing flags' default is the checkpoint's).
HELP = {
    "data_dir": "folder with front_metadata.json etc. (the original layout)",
    "num_workers": "shard preparation processes, at most the machine's cores (1: inline)",
    "batch_size": "pairs per forward pass",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m controlnet_ray.evaluate",
        description="Evaluate a checkpoint (PSNR, SSIM, pose error, ArcFace identity) against "
        "trivial baselines on a split of a dataset in the original layout.",
    )
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pth)")
    add_flags(p, "data", ["data_dir"], help=HELP, required=["data_dir"])
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--out", default=None, help="JSON report (default: eval_<split>.json)")
    p.add_argument("--grid", default=None, help="comparison PNG (default: <out stem>_grid.png)")
    p.add_argument("--arcface", default=None, help="ArcFace ONNX model for identity cosine")
    add_flags(p, "data", ["image_dir", "cache_dir", "skip_bad_images", "num_workers"], help=HELP)
    add_flags(
        p,
        "data",
        ["pair_mode", "min_pose_distance", "max_pose_distance"],
        unset_means="the checkpoint's",
    )
    p.add_argument("--max_pairs", type=int, default=0, help="evenly spaced subset (0: all)")
    p.add_argument(
        "--mean_images",
        type=int,
        default=1000,
        help="training targets averaged for the mean_target baseline (even sample)",
    )
    p.add_argument("--grid_pairs", type=int, default=8, help="pairs shown in the grid PNG")
    p.add_argument(
        "--no_judges",
        action="store_true",
        help="skip the independent judges (controlnet_ray.judging; the first run on a dataset "
        "trains the pose judge, about a minute of CPU)",
    )
    add_flags(p, "data", ["batch_size"], help=HELP)
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    return p


def _validate(args: argparse.Namespace) -> tuple[Path, Path]:
    """Flag checks before anything heavy; returns (report path, grid path)."""
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise InferenceError(f"--checkpoint {ckpt}: file not found")
    if ckpt.suffix.lower() == ".onnx":
        raise InferenceError(
            f"--checkpoint {ckpt}: evaluate needs the training .pth (it uses the pose head, "
            "which the ONNX export leaves out)"
        )
    if not Path(args.data_dir).is_dir():
        raise InferenceError(f"--data_dir {args.data_dir}: no such folder")
    if args.arcface is not None and not Path(args.arcface).is_file():
        raise InferenceError(f"--arcface {args.arcface}: file not found")
    try:  # the data flags given, checked as training checks them
        section_from_namespace(args, "data", given_only=True)
    except ConfigError as exc:
        raise InferenceError(str(exc)) from exc
    # --batch_size is checked above with the data flags; --num_workers 0 (inline) is valid
    # for training's preparation but not here
    for flag in ("grid_pairs", "mean_images", "num_workers"):
        if getattr(args, flag) < 1:
            raise InferenceError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.max_pairs < 0:
        raise InferenceError(f"--max_pairs must be >= 0, got {args.max_pairs}")
    out = check_output_path(args.out or f"eval_{args.split}.json", "--out")
    if out.suffix.lower() != ".json":
        raise InferenceError(f"--out {out}: the report is JSON; give a .json path")
    grid = check_output_path(args.grid or out.with_name(f"{out.stem}_grid.png"), "--grid")
    if grid.suffix.lower() != ".png":
        raise InferenceError(f"--grid {grid}: give a .png path")
    return out, grid


def run(args: argparse.Namespace, out: Path, grid_path: Path) -> int:
    """Load, score, judge, write the report and grid, print (after validation: imports torch)."""
    from controlnet_ray.files import dumps_strict
    from controlnet_ray.inference import load_model, resolve_torch_device
    from controlnet_ray.judging import format_report
    from controlnet_ray.judging.arcface import ArcFaceScorer
    from controlnet_ray.judging.checkpoint_report import (
        build_report,
        format_table,
        judge_split,
        load_split,
        score_pairs,
        write_grid,
    )

    device = resolve_torch_device(args.device)
    loaded = load_model(args.checkpoint, device)
    split = load_split(args, loaded)
    # ArcFace is a side metric: on a GPU run it uses onnxruntime's CUDA provider when installed
    # (onnxruntime-gpu) and the CPU otherwise, and says which.
    arcface = (
        ArcFaceScorer(args.arcface, "cpu" if device.type == "cpu" else "auto")
        if args.arcface
        else None
    )
    if arcface is not None:
        print(f"ArcFace: {arcface.path} on {arcface.session.get_providers()[0]}")
    acc, outputs = score_pairs(loaded, split, args.batch_size, device, arcface)
    report = build_report(args, loaded, split, acc, grid_path)
    if not args.no_judges:
        report["judged"] = judge_split(args, loaded, split, arcface, device)
    write_grid(grid_path, split, outputs, args.grid_pairs)
    out.write_text(dumps_strict(report) + "\n", encoding="utf-8")
    print(format_table(report))
    if "judged" in report:
        print(format_report(report["judged"]))
    print(f"wrote {out} and {grid_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    return run_cli(
        argv,
        build_parser(),
        _validate,
        lambda args, paths: run(args, *paths),
        errors=(DataError, ConfigError, DetectorError),
    )


if __name__ == "__main__":
    sys.exit(main())
