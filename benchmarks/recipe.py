"""One training recipe on the embedded dataset, judged: how the generator's design choices were
compared (``benchmarks/README.md``, "Faces that turn").

Trains ImageControlNet in-process (pure PyTorch ``TrainEngine``, no Ray) for a number of epochs
of the training command's own pairs (front photo -> video frame of the train persons, batch 16,
the original's ``--lr 1e-4`` and ``--loss_type mse`` unless given), with the command's warm-up and
cosine schedule, then prints the independent judges' report on the held-out (val + test)
persons and writes a comparison grid and a yaw sweep of one held-out identity.

    python benchmarks/recipe.py --epochs 12 --out recipe/          # the defaults
    python benchmarks/recipe.py --epochs 12 --generator plain --framing arcface
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see quality.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import assert_no_ray  # noqa: E402  (benchmarks/)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from controlnet_ray.config import FILL_SEEDS, LOSS_TYPES, DataConfig, TrainConfig  # noqa: E402
from controlnet_ray.data.pairs import make_pairs  # noqa: E402
from controlnet_ray.engine import (  # noqa: E402
    Adversary,
    TrainEngine,
    build_disc_optimizer,
    build_optimizer,
    build_scheduler,
    resolve_amp,
)
from controlnet_ray.judging import format_report, prepare_judging  # noqa: E402
from controlnet_ray.judging.data import load_rows, to_model_range  # noqa: E402
from controlnet_ray.model import build_model  # noqa: E402
from controlnet_ray.model.discriminator import build_discriminator  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--loss_type", choices=LOSS_TYPES, default="mse")
    p.add_argument("--generator", default="warp")
    p.add_argument("--framing", default=DataConfig.framing)
    p.add_argument("--fill_seed", choices=FILL_SEEDS, default=None, help="default: the config's")
    p.add_argument("--background_loss_weight", type=float, default=None)
    p.add_argument("--adversarial_loss_weight", type=float, default=0.0)
    p.add_argument("--disc_lr", type=float, default=None, help="default: the config's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("recipe"))
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data = dataclasses.replace(cfg.data, framing=args.framing)
    model = {"generator": args.generator}
    if args.fill_seed is not None:
        model["fill_seed"] = args.fill_seed
    cfg.model = dataclasses.replace(cfg.model, **model)
    optim = {"lr": args.lr, "epochs": args.epochs, "loss_type": args.loss_type,
             "adversarial_loss_weight": args.adversarial_loss_weight}  # fmt: skip
    if args.disc_lr is not None:
        optim["disc_lr"] = args.disc_lr
    if args.background_loss_weight is not None:
        optim["background_loss_weight"] = args.background_loss_weight
    cfg.optim = dataclasses.replace(cfg.optim, **optim)
    return cfg.validate()


def train(cfg: TrainConfig, shards: Path, args: argparse.Namespace) -> torch.nn.Module:
    rows = load_rows(shards, ("train",))
    images, poses = to_model_range(rows.images), torch.as_tensor(rows.poses, dtype=torch.float32)
    pairs = np.asarray(make_pairs(rows.columns(), "front_to_video"))
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    steps = len(pairs) // args.batch_size
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    cpu, amp = torch.device("cpu"), resolve_amp(False, torch.device("cpu"))
    adversary = None
    if cfg.optim.adversarial_loss_weight > 0:
        disc = build_discriminator(cfg.model)
        adversary = Adversary(disc, build_disc_optimizer(disc, cfg.optim), cpu, amp)
    engine = TrainEngine(model, optimizer, scheduler, cfg.optim, cpu, amp, adversary=adversary)
    order = torch.Generator().manual_seed(args.seed)
    t_cpu = time.process_time()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(pairs), generator=order).numpy()
        losses = []
        for k in range(steps):
            src, tgt = pairs[perm[k * args.batch_size : (k + 1) * args.batch_size]].T
            batch = {"source": images[src], "target": images[tgt],
                     "source_pose": poses[src], "target_pose": poses[tgt]}  # fmt: skip
            losses.append(engine.train_micro_batch(batch, k == steps - 1).image_loss)
        print(f"epoch {epoch}: image loss {np.mean(losses):.4f}, "
              f"{time.process_time() - t_cpu:.0f} CPU-s", flush=True)  # fmt: skip
    return model.eval()


def save_pictures(model: torch.nn.Module, judging, out: Path) -> None:
    """A grid (source, target, output) of held-out pairs and a yaw sweep of one held-out face."""
    ev = judging.scorer.ev
    pick = np.linspace(0, len(ev) - 1, 8).astype(int)
    with torch.no_grad():
        outputs = model.generate(ev.source[pick], ev.source_pose[pick], ev.target_pose[pick])
        yaws = torch.tensor([[y, 0.0, 0.0] for y in (-60, -30, 0, 30, 60)])
        face = ev.source[:1].expand(5, -1, -1, -1)
        sweep = model.generate(face, ev.source_pose[:1].expand(5, -1), yaws)

    def rgb(x: torch.Tensor) -> np.ndarray:
        return ((x.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)

    rows = [np.hstack([rgb(ev.source[i]), rgb(ev.target[i]), rgb(o)]) for i, o in
            zip(pick, outputs, strict=True)]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / "grid.png"), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))
    strip = np.hstack([rgb(ev.source[0]), *(rgb(s) for s in sweep)])
    cv2.imwrite(str(out / "sweep.png"), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = config(args)
    from controlnet_ray.launcher import resolve_shards

    shards = resolve_shards(cfg)
    model = train(cfg, shards, args)
    judging = prepare_judging(shards, cfg.data.resolved_cache_dir())
    print(format_report(judging.report(model.generate, torch.device("cpu"))))
    save_pictures(model, judging, args.out)
    print(f"wrote {args.out / 'grid.png'} and {args.out / 'sweep.png'}")
    assert_no_ray("the recipe benchmark")


if __name__ == "__main__":
    main()
