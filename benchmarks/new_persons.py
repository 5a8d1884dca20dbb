"""Judge checkpoints on persons that neither the generator nor the judges ever saw.

The embedded dataset holds out only 6 persons (3 val, 3 test), and identity top-1 among them moves
by about 10 points between two training seeds of the same recipe (57 % and 67 %): one recipe
cannot be ranked above another on them.  A synthetic person depends only on the renderer's seed and
its index, so the persons past the training set's last index in a larger set with the same seed
are new people.  This script takes ``--persons`` of them, splits them into groups of
``--group`` (6: the embedded set's held-out count, so the figure reads like the demo's), judges
every front photo -> video frame pair with the training set's own judges (trained on its train
persons only) and reports identity top-1 within each group, averaged over the groups with its
standard error, plus the judged pose, face PSNR and sharpness over all pairs.  The same rows for
copying the source and the judges' floor (real targets) come first.

    python benchmarks/new_persons.py runs/demo/checkpoints/best_model.pth
    python benchmarks/new_persons.py a.pth b.pth --persons 120 --json new_persons.json

The training set is the checkpoint's embedded one (``--identities``/``--frames``: 40 x 16, the
default); the new persons come from the 400 x 24 set of ``benchmarks/quality.py`` (rendered and
prepared into the cache on first use).  The script fails if anything imported Ray.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see quality.py

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import assert_no_ray  # noqa: E402  (benchmarks/)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from controlnet_ray.config import DataConfig, TrainConfig  # noqa: E402
from controlnet_ray.data.pairs import make_pairs  # noqa: E402
from controlnet_ray.data.shards import load_manifest  # noqa: E402
from controlnet_ray.judging.data import Rows, build_eval_set, load_rows  # noqa: E402
from controlnet_ray.judging.identity_judge import ensure_identity_judge  # noqa: E402
from controlnet_ray.judging.pose_judge import ensure_pose_judge  # noqa: E402
from controlnet_ray.judging.report import Scorer  # noqa: E402
from controlnet_ray.judging.session import fit_trivial  # noqa: E402
from controlnet_ray.metrics import face_mask  # noqa: E402

YAW_BINS = ((0, 20), (20, 40), (40, 60), (60, 91))
#: Bins of a pair's pose change (the largest of |target - source| over yaw, pitch, roll).  Where
#: the change is small, copying the ID photo is nearly a right-pose output that keeps the photo's
#: even light: its identity there is what a generator can reach without the video's lighting,
#: which its inputs do not contain (the right person's candidate frame shares the target's).
CHANGE_BINS = ((0, 20), (20, 40), (40, 181))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", type=Path, help="model files to judge")
    p.add_argument("--identities", type=int, default=40, help="the training set's identities")
    p.add_argument("--frames", type=int, default=16, help="the training set's frames")
    p.add_argument("--persons", type=int, default=120, help="new persons to judge on")
    p.add_argument("--group", type=int, default=6, help="persons per retrieval group")
    p.add_argument("--cache_dir", default=None, help="default $CONTROLNET_RAY_CACHE or ~/.cache")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    return p.parse_args(argv)


def _shards(args: argparse.Namespace, identities: int, frames: int) -> Path:
    """The prepared shards of the embedded set of that size (rendered and prepared if absent)."""
    from controlnet_ray.launcher import resolve_shards

    cfg = TrainConfig()
    cfg.data = _data(args, identities, frames)
    return resolve_shards(cfg)


def _data(args: argparse.Namespace, identities: int, frames: int) -> DataConfig:
    return dataclasses.replace(
        DataConfig(), cache_dir=args.cache_dir, synthetic_identities=identities,
        synthetic_frames=frames,
    )  # fmt: skip


def _index(name: str) -> int:
    """A synthetic person's index (``synth_0042``, ``synth 0005``, ``合成_0003``)."""
    return int(str(name)[-4:])


def new_person_mask(names: np.ndarray, first: int, count: int) -> np.ndarray:
    """Rows of the synthetic persons with index ``first .. first + count - 1``: with ``first``
    the training set's identity count, persons it does not hold."""
    index = np.array([_index(p) for p in names])
    return (index >= first) & (index < first + count)


def person_groups(persons: list[str], size: int) -> list[list[str]]:
    """Sorted persons in consecutive groups of ``size`` (a short last group is left out)."""
    ordered = sorted(persons)
    return [ordered[i : i + size] for i in range(0, len(ordered) - size + 1, size)]


def group_pairs(rows: Rows, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each group of ``size`` persons (:func:`person_groups`): the bool mask of its rows and its
    front photo -> video frame pairs, as indices into ``rows.subset(mask)``."""
    out = []
    for members in person_groups(list(set(rows.person)), size):
        keep = np.isin(rows.person, members)
        out.append((keep, make_pairs(rows.subset(keep).columns(), "front_to_video")))
    return out


def build_groups(
    args: argparse.Namespace,
) -> tuple[list[Scorer], dict[str, Callable], Rows, list[tuple[np.ndarray, np.ndarray]]]:
    """Scorers on groups of new persons, judged by the training set's judges; the trivial
    predictors fitted on the training set's train video frames (as the product's report); and
    the new persons' rows with each group's (row mask, pairs) the scorers were built from."""
    if args.identities + args.persons > 400:
        raise SystemExit(f"--persons: at most {400 - args.identities} new persons in the 400 set")
    train_shards = _shards(args, args.identities, args.frames)
    new_shards = _shards(args, 400, 24)
    cache = _data(args, args.identities, args.frames).resolved_cache_dir()
    judge = ensure_pose_judge(train_shards, cache, verbose=False)
    identity = ensure_identity_judge(train_shards, cache, verbose=False)
    rows = load_rows(new_shards)
    rows = rows.subset(new_person_mask(rows.person, args.identities, args.persons))
    mask = face_mask(int(rows.images.shape[1]), load_manifest(new_shards).framing)
    split = group_pairs(rows, args.group)
    groups = [
        Scorer(build_eval_set(rows.subset(keep), pairs), judge, mask, None, identity=identity)
        for keep, pairs in split
    ]
    return groups, fit_trivial(train_shards, ("video",), mask).as_dict(), rows, split


def summarise(per_group: list[dict[str, np.ndarray]], groups: list[Scorer]) -> dict:
    """Group-averaged identity (and its standard error) plus pair-level medians and means."""
    top1 = np.array([g["id_top1"].mean() for g in per_group])
    allp = {k: np.concatenate([g[k] for g in per_group]) for k in per_group[0]}
    yaw = np.abs(np.concatenate([g.ev.target_pose[:, 0].numpy() for g in groups]))
    change = np.concatenate(
        [(g.ev.target_pose - g.ev.source_pose).abs().amax(1).numpy() for g in groups]
    )
    return {
        "id_top1": float(top1.mean()),
        "id_top1_se": float(top1.std(ddof=1) / np.sqrt(len(top1))),
        "id_top1_by_abs_yaw": _binned_mean(allp["id_top1"], yaw, YAW_BINS),
        "id_top1_by_pose_change": _binned_mean(allp["id_top1"], change, CHANGE_BINS),
        "yaw_err": float(np.median(allp["pose_err"][:, 0])),
        "pitch_err": float(np.median(allp["pose_err"][:, 1])),
        "psnr_face": float(allp["psnr_face"].mean()),
        "sharpness": float(np.median(allp["sharpness"])),
        "pairs": int(len(yaw)),
    }


def _binned_mean(
    values: np.ndarray, key: np.ndarray, bins: tuple[tuple[int, int], ...]
) -> dict[str, float]:
    """``"lo-hi"`` -> the mean of ``values`` where ``lo <= key < hi``."""
    return {f"{lo}-{hi}": float(values[(key >= lo) & (key < hi)].mean()) for lo, hi in bins}


def judge(groups: list[Scorer], outputs: Callable[[Scorer], torch.Tensor]) -> dict:
    return summarise([g.score(outputs(g)) for g in groups], groups)


def line(name: str, s: dict) -> str:
    bins = " ".join(f"{v:4.0%}" for v in s["id_top1_by_abs_yaw"].values())
    return (
        f"{name:28s} {s['id_top1']:6.1%} +-{s['id_top1_se']:4.1%}   {bins}   "
        f"{s['yaw_err']:5.1f} {s['pitch_err']:5.1f}  {s['psnr_face']:6.2f}  {s['sharpness']:5.2f}"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    groups, trivial, _, _ = build_groups(args)
    results = {"floor": summarise([g.floor for g in groups], groups)}
    for name, fn in trivial.items():
        results[name] = judge(groups, lambda g, f=fn: g.predict(f))
    from controlnet_ray.inference import load_model

    for path in args.checkpoints:
        model = load_model(path).model
        results[str(path)] = judge(groups, lambda g, m=model: g.predict(m.generate))
    n = len(groups)
    print(f"{results['floor']['pairs']} pairs of {n * args.group} new persons in {n} groups of "
          f"{args.group} (identity chance {1 / args.group:.0%}); judges of the "
          f"{args.identities}-identity training set")  # fmt: skip
    print(f"{'predictor':28s} id top1 (+-se)   by |yaw| 0-20 20-40 40-60 60-90   yaw  pitch"
          "    face  sharp")  # fmt: skip
    for name, s in results.items():
        print(line(name[-28:], s))
    print(f"\nidentity top-1 by the pair's pose change (largest |target - source| of yaw, pitch, "
          f"roll; {', '.join(f'{lo}-{hi}' for lo, hi in CHANGE_BINS)} deg): the ID photo where "
          "the change is small is what an output with the photo's light reaches")  # fmt: skip
    for name, s in results.items():
        bins = " ".join(f"{v:4.0%}" for v in s["id_top1_by_pose_change"].values())
        print(f"{name[-28:]:28s} {bins}")
    best = max(results[k]["psnr_face"] for k in ("pose_bin", "pose_bin_colour"))
    for path in args.checkpoints:
        s, floor = results[str(path)], results["floor"]
        print(f"{str(path)[-40:]}: judged yaw x{s['yaw_err'] / floor['yaw_err']:.2f} of the floor, "
              f"pitch x{s['pitch_err'] / floor['pitch_err']:.2f}; face PSNR "
              f"{s['psnr_face'] - best:+.2f} dB over the best trivial predictor; identity top-1 "
              f"{s['id_top1']:.1%} +- {s['id_top1_se']:.1%}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, allow_nan=False), encoding="utf-8")
        print(f"wrote {args.json}")
    assert_no_ray("the new-persons benchmark")
    return results


if __name__ == "__main__":
    main()
