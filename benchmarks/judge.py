"""The independent judges on the embedded synthetic dataset: the floor and the trivial predictors.

Trains (or loads from the cache) the pose judge on the train persons' real crops, then judges the
held-out persons' front photo -> video frame pairs (val + test persons) for the trivial
predictors (``controlnet_ray.judging.predictors``) and prints the full judged report. These rows
are what a model's row (``controlnet_ray.evaluate``, ``benchmarks/quality.py``) is read against.

    python benchmarks/judge.py                          # 40 identities (the training default)
    python benchmarks/judge.py --identities 400 --frames 24 --json judge.json
    python benchmarks/judge.py --shards prepared_shards/

The judge is cached under ``<cache>/judges/`` keyed by the shard directory's manifest, so a second
run (and ``evaluate`` on the same data) reuses it; ``--retrain`` trains a fresh one into a
temporary cache to time it. The script fails if anything imported Ray.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see quality.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import assert_no_ray  # noqa: E402  (benchmarks/)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from controlnet_ray.config import DataConfig, TrainConfig  # noqa: E402
from controlnet_ray.judging import JudgeSettings, format_report  # noqa: E402
from controlnet_ray.judging.session import prepare_judging  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--identities", type=int, default=40)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--image_size", type=int, default=DataConfig.image_size)
    p.add_argument("--shards", type=Path, default=None, help="a prepared shard directory")
    p.add_argument("--cache_dir", default=None, help="default $CONTROLNET_RAY_CACHE or ~/.cache")
    p.add_argument("--seed", type=int, default=0, help="the judge's seed")
    p.add_argument("--max_pairs", type=int, default=0, help="even subset of pairs (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--retrain", action="store_true", help="train the judge afresh (temp cache)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    cfg.data = dataclasses.replace(
        cfg.data,
        cache_dir=args.cache_dir,
        image_size=args.image_size,
        synthetic_identities=args.identities,
        synthetic_frames=args.frames,
    )
    cfg.model = dataclasses.replace(cfg.model, image_size=args.image_size)
    if args.shards is None:
        from controlnet_ray.launcher import resolve_shards

        shards = resolve_shards(cfg)
    else:
        shards = args.shards
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) if args.retrain else cfg.data.resolved_cache_dir()
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        judging = prepare_judging(
            shards, cache, max_pairs=args.max_pairs, settings=JudgeSettings(seed=args.seed)
        )
        setup = {"cpu_s": time.process_time() - t_cpu, "wall_s": time.perf_counter() - t_wall}
    report = judging.report()
    print(f"shards {shards}; judge {judging.scorer.judge.info}")
    print(
        f"setup (judge load/train, pairs, baselines) {setup['cpu_s']:.0f} CPU-s, "
        f"{setup['wall_s']:.0f} wall-s"
    )
    print(format_report(report))
    report = {"shards": str(shards), "setup": setup, **report}
    if args.json:
        args.json.write_text(json.dumps(report, allow_nan=False), encoding="utf-8")
        print(f"wrote {args.json}")
    assert_no_ray("the judge benchmark")
    return report


if __name__ == "__main__":
    main()
