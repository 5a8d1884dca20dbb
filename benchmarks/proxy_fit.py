"""How well the warp generator's untrained 3D proxy turns heads, for a grid of proxy shapes.

The warp generator starts from the analytic motion of an ellipsoid (``model.warp``); the closer
that seed is to the real motion, the less the network must learn.  This scores the *bare* proxy
warp (no network: source warped where the proxy saw it, the source head's mean colour where it
did not) on training persons' front photo -> video frame pairs, with the independent pose judge
(``controlnet_ray.judging``) and head-region PSNR, for centre-depth and radius variations.  It
chose ``PROXY_CENTER``/``PROXY_RADII``; rerun it after changing the framing or the renderer.

    python benchmarks/proxy_fit.py            # embedded dataset, 200 training pairs
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see quality.py

import argparse  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import assert_no_ray  # noqa: E402  (benchmarks/)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from controlnet_ray.config import TrainConfig  # noqa: E402
from controlnet_ray.judging.session import prepare_judging  # noqa: E402
from controlnet_ray.metrics import psnr_per_image  # noqa: E402
from controlnet_ray.model import warp as proxy  # noqa: E402
from controlnet_ray.model.controlnet import head_colour  # noqa: E402


def bare_warp(source: torch.Tensor, flow: proxy.ProxyFlow) -> torch.Tensor:
    """The proxy's seed image: warped source where visible, the head's mean colour elsewhere."""
    colour = head_colour(source, flow)
    return flow.visible * proxy.warp(source, flow.grid) + (1 - flow.visible) * colour


def score(scorer, centre: tuple, radii: tuple) -> tuple[float, list[float]]:
    """(head PSNR, median judged |error| yaw/pitch/roll) of the bare warp with this proxy."""
    ev = scorer.ev
    old = proxy.PROXY_CENTER, proxy.PROXY_RADII
    proxy.PROXY_CENTER, proxy.PROXY_RADII = centre, radii
    try:
        size = ev.source.shape[-1]
        out = bare_warp(ev.source, proxy.proxy_flow(ev.source_pose, ev.target_pose, size, size))
    finally:
        proxy.PROXY_CENTER, proxy.PROXY_RADII = old
    psnr = psnr_per_image(out, ev.target, mask=scorer.mask).mean().item()
    with torch.no_grad():
        err = (scorer.judge(out) - ev.target_pose).abs().median(dim=0).values
    return psnr, err.tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_pairs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from controlnet_ray.launcher import resolve_shards

    cfg = TrainConfig()
    shards = resolve_shards(cfg)
    judging = prepare_judging(
        shards, cfg.data.resolved_cache_dir(), held_splits=("train",), max_pairs=args.max_pairs
    )
    print(f"now: centre {proxy.PROXY_CENTER} radii {proxy.PROXY_RADII}")
    y, x = proxy.PROXY_RADII[1], proxy.PROXY_RADII[0]
    for cz, rz, sxy in itertools.product((-0.07, 0.0, 0.08), (0.70, 0.85, 1.0), (0.9, 1.0, 1.1)):
        psnr, err = score(judging.scorer, (0.0, proxy.PROXY_CENTER[1], cz), (x * sxy, y * sxy, rz))
        print(
            f"centre z {cz:+.2f}  depth radius {rz:.2f}  x/y radii x{sxy:.1f}:  head PSNR "
            f"{psnr:.2f} dB  judged yaw {err[0]:.1f}  pitch {err[1]:.1f}  roll {err[2]:.1f}",
            flush=True,
        )
    assert_no_ray("the proxy fit")


if __name__ == "__main__":
    main()
