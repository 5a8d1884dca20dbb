"""What the identity judge gives a perfect generator: the new persons' real targets, rendered again
under the ID photo's conditions, judged as if a model had made them.

A generator sees the ID photo and the requested pose, nothing of the video: not its moving
coloured light, not its drifting cluttered background, not its sensor noise.  The judges' floor
(real targets, 96 %) holds all of those, and the right person's identity candidate -- another
frame of the same video -- shares them.  This script renders every video frame of the
``new_persons.py`` persons again with the same person, pose, framing and landmark noise, but

* ``--variant light``: the ID photo's even frontal light (background and noise of the video), or
* ``--variant photo``: the photo's light, a plain photo background and no sensor noise -- what a
  generator that gets everything right can at best output from its inputs,

and judges those images against the usual candidates (real frames), exactly as
``benchmarks/new_persons.py`` judges a checkpoint.  The variant set is rendered once into
``<cache>/identity_ceiling/<variant>`` (about 10 minutes on 2 cores).

    python benchmarks/identity_ceiling.py --variant photo --persons 360
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see quality.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import assert_no_ray  # noqa: E402  (benchmarks/)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import new_persons  # noqa: E402  (benchmarks/)

from controlnet_ray.config import DataConfig, TrainConfig  # noqa: E402
from controlnet_ray.data.synthetic import dataset as synthetic_dataset  # noqa: E402
from controlnet_ray.data.synthetic.spec import Background, Lighting  # noqa: E402
from controlnet_ray.judging.data import load_rows, to_model_range  # noqa: E402

VARIANTS = ("light", "photo")
#: The ID photo's light (``views.front_view`` without its small random sideways tilt).
PHOTO_LIGHT = Lighting((0.0, -0.3, -1.0), (1.0, 1.0, 0.98), 0.55, 0.55)
_ENV = "CONTROLNET_RAY_CEILING_VARIANT"  # read by spawned rendering processes too
_render_view = synthetic_dataset.render_view


def _render_under_photo_conditions(identity, view, image_px, rng):  # noqa: ANN001, ANN202
    """``views.render_view`` for the variant: a video frame under the photo's conditions, drawing
    from ``rng`` exactly what the original draws, so the landmarks (hence the pose estimates and
    the crops) of every later frame are the original's."""
    variant = os.environ.get(_ENV)
    if variant is None or view.role != "video":
        return _render_view(identity, view, image_px, rng)
    changed = {"lighting": PHOTO_LIGHT}
    if variant == "photo":
        changed |= {"background": Background(), "noise": 0.0}
    rgb, landmarks, box = _render_view(
        identity, dataclasses.replace(view, **changed), image_px, rng
    )
    if view.noise > 0 and variant == "photo":
        rng.standard_normal(rgb.shape, dtype=np.float32)  # the noise draw the video made
    return rgb, landmarks, box


# At import, so that the spawned rendering processes (which import this script) render the variant.
synthetic_dataset.render_view = _render_under_photo_conditions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=VARIANTS, default="photo")
    p.add_argument("--persons", type=int, default=360, help="new persons (new_persons.py)")
    p.add_argument("--group", type=int, default=6, help="persons per retrieval group")
    p.add_argument("--cache_dir", default=None, help="default $CONTROLNET_RAY_CACHE or ~/.cache")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def variant_rows(args: argparse.Namespace):  # noqa: ANN201
    """All rows of the 400 x 24 set rendered under the variant's conditions."""
    from controlnet_ray.launcher import resolve_shards

    base = DataConfig(cache_dir=args.cache_dir).resolved_cache_dir()
    cfg = TrainConfig()
    cfg.data = dataclasses.replace(
        DataConfig(), cache_dir=str(base / "identity_ceiling" / args.variant),
        synthetic_identities=400, synthetic_frames=24,
    )  # fmt: skip
    os.environ[_ENV] = args.variant
    try:
        return load_rows(resolve_shards(cfg))
    finally:
        del os.environ[_ENV]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    np_args = new_persons.parse_args(
        ["--persons", str(args.persons), "--group", str(args.group)]
        + (["--cache_dir", args.cache_dir] if args.cache_dir else [])
    )
    groups, _, real, split = new_persons.build_groups(np_args)
    variant = variant_rows(args)
    variant = variant.subset(
        new_persons.new_person_mask(variant.person, np_args.identities, np_args.persons)
    )
    same = np.array_equal(real.person, variant.person) and np.array_equal(real.role, variant.role)
    if not same or not np.array_equal(real.poses, variant.poses):
        raise SystemExit("the variant set's rows or estimated poses differ from the real set's")
    # each group's targets, rendered under the photo's conditions (the scorers' pairs, in order)
    outputs = [to_model_range(variant.subset(keep).images[pairs[:, 1]]) for keep, pairs in split]
    scored = [g.score(out) for g, out in zip(groups, outputs, strict=True)]
    results = {
        "floor": new_persons.summarise([g.floor for g in groups], groups),
        "source": new_persons.judge(groups, lambda g: g.ev.source),
        f"targets, {args.variant}": new_persons.summarise(scored, groups),
    }
    print(f"{len(groups) * args.group} new persons in groups of {args.group}; outputs = the real "
          f"targets rendered under the ID photo's conditions ({args.variant})")  # fmt: skip
    for name, s in results.items():
        bins = " ".join(f"{v:4.0%}" for v in s["id_top1_by_pose_change"].values())
        print(f"{new_persons.line(name, s)}   by pose change 0-20/20-40/40+: {bins}")
    assert_no_ray("the identity ceiling benchmark")
    return results


if __name__ == "__main__":
    main()
