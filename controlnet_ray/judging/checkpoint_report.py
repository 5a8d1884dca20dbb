"""What ``python -m controlnet_ray.evaluate`` reports about a checkpoint on a split.

The split's pairs (shards at the checkpoint's image size and split ratios, pairs by its pair
rule), scored for the model and two pixel baselines (``source``, ``mean_target``) with PSNR,
SSIM, the model's own pose head and optional ArcFace cosine; PSNR by target-yaw bin; the
printed table and the comparison grid; and the same pairs judged by this package's
independent judges (:func:`judge_split`, the report's ``judged`` section)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from controlnet_ray.inference import AXES, InferenceError

if TYPE_CHECKING:
    import argparse

    import torch

    from controlnet_ray.inference import LoadedModel
    from controlnet_ray.judging.arcface import ArcFaceScorer

METHODS = ("model", "baseline_source", "baseline_mean_target")
YAW_BIN_DEG = 10.0


# --------------------------------------------------------------------------- data


@dataclass
class SplitData:
    """The evaluated split's rows, its pairs and the mean training target."""

    shards_dir: Path
    rows: dict[str, list[Any]]
    pairs: np.ndarray  # [P, 2] row indices (source, target)
    mean_target: np.ndarray  # [3, S, S] float32 in [-1, 1]
    mean_target_count: int
    data_config: Any


def _data_config(args: argparse.Namespace, loaded: LoadedModel) -> Any:
    """Training's data settings (split ratios, pairing), this run's paths and overrides."""
    base = loaded.config.data
    return dataclasses.replace(
        base,
        data_dir=args.data_dir,
        image_dir=args.image_dir,
        image_size=loaded.image_size,
        cache_dir=args.cache_dir,
        skip_bad_images=args.skip_bad_images,
        num_workers=args.num_workers,
        pair_mode=args.pair_mode or base.pair_mode,
        min_pose_distance=_pick(args.min_pose_distance, base.min_pose_distance),
        max_pose_distance=_pick(args.max_pose_distance, base.max_pose_distance),
    )


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


def load_split(args: argparse.Namespace, loaded: LoadedModel) -> SplitData:
    """Shards (prepared or reused), the split's pairs and the mean training target."""
    from controlnet_ray.data.pairs import make_pairs
    from controlnet_ray.data.shards import ensure_shards, read_shard_table

    cfg = _data_config(args, loaded)
    shards = ensure_shards(cfg, num_workers=args.num_workers)
    rows = read_shard_table(shards, args.split).to_pydict()
    pairs = make_pairs(rows, cfg.pair_mode, cfg.min_pose_distance, cfg.max_pose_distance)
    if len(pairs) == 0:
        raise InferenceError(
            f"split {args.split!r} of {args.data_dir} has no {cfg.pair_mode} pairs with pose "
            f"distance {cfg.min_pose_distance:g}..{cfg.max_pose_distance:g} deg"
        )
    pairs = _even_subset(pairs, args.max_pairs) if args.max_pairs else pairs
    train = read_shard_table(shards, "train").to_pydict()
    train_pairs = make_pairs(train, cfg.pair_mode, cfg.min_pose_distance, cfg.max_pose_distance)
    targets = np.unique(train_pairs[:, 1]) if len(train_pairs) else np.arange(0)
    if len(targets) == 0:
        raise InferenceError(f"{shards}: the train split has no pairs; no mean_target baseline")
    targets = _even_subset(targets, args.mean_images)
    mean = np.mean([_decode(train["image"][int(i)]) for i in targets], axis=0)
    return SplitData(shards, rows, pairs, mean.astype(np.float32), len(targets), cfg)


def _even_subset(items: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` items spread evenly over ``items`` (deterministic, covers every person)."""
    if len(items) <= limit:
        return items
    return items[np.linspace(0, len(items) - 1, limit).round().astype(int)]


def _decode(data: bytes) -> np.ndarray:
    from controlnet_ray.data.decode import decode_image

    return decode_image(data)


# --------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """Per-pair metrics of one method, in pair order."""

    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    pose_err: list[list[float]] = field(default_factory=list)  # [P][3] degrees
    identity: list[float] = field(default_factory=list)  # empty without --arcface


def _batch_tensors(split: SplitData, idx: np.ndarray, device: torch.device) -> dict:
    import torch

    rows, pairs = split.rows, split.pairs[idx]

    def stack(col: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([_decode(rows["image"][int(i)]) for i in pairs[:, col]]))

    def poses(col: int) -> torch.Tensor:
        ypr = [[rows[a][int(i)] for a in AXES] for i in pairs[:, col]]
        return torch.tensor(ypr, dtype=torch.float32)

    out = {"source": stack(0), "target": stack(1), "source_pose": poses(0), "target_pose": poses(1)}
    return {k: v.to(device) for k, v in out.items()}


def _score(
    name: str, images: torch.Tensor, pose_pred: torch.Tensor, batch: dict, acc: dict[str, Scores]
) -> None:
    from controlnet_ray.metrics import pose_abs_error_deg, psnr_per_image, ssim_per_image
    from controlnet_ray.model import POSE_SCALE_DEG

    s = acc[name]
    s.psnr += psnr_per_image(images, batch["target"]).tolist()
    s.ssim += ssim_per_image(images, batch["target"]).tolist()
    err = pose_abs_error_deg(pose_pred, batch["target_pose"], POSE_SCALE_DEG)
    s.pose_err += err.tolist()


def score_pairs(
    loaded: LoadedModel,
    split: SplitData,
    batch_size: int,
    device: torch.device,
    arcface: ArcFaceScorer | None,
) -> tuple[dict[str, Scores], dict[int, np.ndarray]]:
    """Run the model and the baselines over every pair; also the outputs shown in the grid."""
    import torch

    model = loaded.model
    acc = {m: Scores() for m in METHODS}
    mean = torch.from_numpy(split.mean_target).to(device)[None]
    keep: dict[int, np.ndarray] = {}
    with torch.no_grad():
        mean_pose = model.pose_head(mean)
        for start in range(0, len(split.pairs), batch_size):
            idx = np.arange(start, min(start + batch_size, len(split.pairs)))
            batch = _batch_tensors(split, idx, device)
            out = model(batch["source"], batch["source_pose"], batch["target_pose"])
            means = mean.expand_as(batch["target"])
            _score("model", out.image, out.pose_pred, batch, acc)
            _score("baseline_source", batch["source"], model.pose_head(batch["source"]), batch, acc)
            _score("baseline_mean_target", means, mean_pose.expand(len(idx), 3), batch, acc)
            if arcface is not None:
                _identity(
                    arcface,
                    batch,
                    {
                        "model": out.image,
                        "baseline_source": batch["source"],
                        "baseline_mean_target": means,
                    },
                    acc,
                )
            for j, i in enumerate(idx):
                keep[int(i)] = out.image[j].float().cpu().numpy()
    return acc, keep


def _identity(
    arcface: ArcFaceScorer, batch: dict, outputs: dict[str, torch.Tensor], acc: dict[str, Scores]
) -> None:
    from controlnet_ray.inference import to_rgb8

    def rgb(t: torch.Tensor) -> np.ndarray:
        return np.stack([to_rgb8(x) for x in t.float().cpu().numpy()])

    ref = arcface.embed(rgb(batch["target"]))
    for name, images in outputs.items():
        acc[name].identity += np.sum(arcface.embed(rgb(images)) * ref, axis=1).tolist()


# --------------------------------------------------------------------------- report


def _summary(s: Scores) -> dict[str, Any]:
    err = np.asarray(s.pose_err, np.float64).reshape(-1, 3)
    return {
        "psnr": float(np.mean(s.psnr)),
        "ssim": float(np.mean(s.ssim)),
        "pose_mae_deg": {
            **{a: float(err[:, i].mean()) for i, a in enumerate(AXES)},
            "mean": float(err.mean()),
        },
        "identity_cos": float(np.mean(s.identity)) if s.identity else None,
    }


def yaw_bins(target_yaw: np.ndarray, acc: dict[str, Scores]) -> list[dict[str, Any]]:
    """Mean PSNR per method in 10-degree target-yaw bins ``[lo, lo + 10)``."""
    lows = np.floor(target_yaw / YAW_BIN_DEG) * YAW_BIN_DEG
    out = []
    for lo in np.unique(lows):
        sel = lows == lo
        entry = {"yaw_from": float(lo), "yaw_to": float(lo + YAW_BIN_DEG), "count": int(sel.sum())}
        for m in METHODS:
            entry[f"psnr_{m}"] = float(np.mean(np.asarray(acc[m].psnr)[sel]))
        out.append(entry)
    return out


def _per_pair(split: SplitData, acc: dict[str, Scores]) -> list[dict[str, Any]]:
    rows, out = split.rows, []
    for k, (s, t) in enumerate(split.pairs):
        entry = {
            "person_name": rows["person_name"][int(s)],
            "source_image": rows["image_path"][int(s)],
            "target_image": rows["image_path"][int(t)],
            "source_pose": [float(rows[a][int(s)]) for a in AXES],
            "target_pose": [float(rows[a][int(t)]) for a in AXES],
        }
        for m in METHODS:
            entry[m] = {
                "psnr": acc[m].psnr[k],
                "ssim": acc[m].ssim[k],
                "pose_abs_err_deg": acc[m].pose_err[k],
                "identity_cos": acc[m].identity[k] if acc[m].identity else None,
            }
        out.append(entry)
    return out


def build_report(
    args: argparse.Namespace,
    loaded: LoadedModel,
    split: SplitData,
    acc: dict[str, Scores],
    grid_path: Path,
) -> dict[str, Any]:
    from controlnet_ray.judging.report import persons_warning

    cfg = split.data_config
    target_yaw = np.array([split.rows["yaw"][int(t)] for t in split.pairs[:, 1]], np.float64)
    persons = len({split.rows["person_name"][int(s)] for s in split.pairs[:, 0]})
    return {
        "checkpoint": str(loaded.path),
        "data_dir": str(args.data_dir),
        "split": args.split,
        "shards_dir": str(split.shards_dir),
        "image_size": loaded.image_size,
        "split_ratios": list(cfg.split_ratios),
        "pair_mode": cfg.pair_mode,
        "pose_distance_deg": [cfg.min_pose_distance, cfg.max_pose_distance],
        "num_pairs": int(len(split.pairs)),
        "num_persons": persons,
        "warning": persons_warning(persons),
        "pose_error_measured_by": "the model's pose head (learned; degrees)",
        "mean_target_images": split.mean_target_count,
        "arcface": str(args.arcface) if args.arcface else None,
        "grid": str(grid_path),
        "summary": {m: _summary(acc[m]) for m in METHODS},
        "psnr_by_target_yaw": yaw_bins(target_yaw, acc),
        "per_pair": _per_pair(split, acc),
    }


def format_table(report: dict[str, Any]) -> str:
    """The printed summary: one line per method, then PSNR per target-yaw bin."""
    lines = [report["warning"]] if report.get("warning") else []
    lines += [
        f"{report['split']}: {report['num_pairs']} pairs of {report['num_persons']} persons "
        f"({report['pair_mode']}, {report['pose_distance_deg'][0]:g}.."
        f"{report['pose_distance_deg'][1]:g} deg), image size {report['image_size']}",
        f"{'method':<22}{'PSNR dB':>9}{'SSIM':>8}{'pose MAE deg (y/p/r)':>26}{'ArcFace':>9}",
    ]
    for m in METHODS:
        s = report["summary"][m]
        pose = s["pose_mae_deg"]
        err = f"{pose['mean']:.1f} ({pose['yaw']:.1f}/{pose['pitch']:.1f}/{pose['roll']:.1f})"
        ident = "-" if s["identity_cos"] is None else f"{s['identity_cos']:.3f}"
        lines.append(f"{m:<22}{s['psnr']:>9.2f}{s['ssim']:>8.3f}{err:>26}{ident:>9}")
    lines.append(f"PSNR by target yaw: {'bin':<12}{'n':>5}{'model':>8}{'source':>8}{'mean':>8}")
    for b in report["psnr_by_target_yaw"]:
        label = f"{b['yaw_from']:+.0f}..{b['yaw_to']:+.0f}"
        lines.append(
            f"{'':<20}{label:<12}{b['count']:>5}{b['psnr_model']:>8.2f}"
            f"{b['psnr_baseline_source']:>8.2f}{b['psnr_baseline_mean_target']:>8.2f}"
        )
    return "\n".join(lines)


def write_grid(path: Path, split: SplitData, outputs: dict[int, np.ndarray], n: int) -> None:
    """Rows source / target / output for up to ``n`` evenly chosen pairs (columns)."""
    from controlnet_ray.inference import grid, label_tile, to_rgb8, write_image

    chosen = _even_subset(np.arange(len(split.pairs)), n)
    rows: list[list[np.ndarray]] = [[], [], []]
    for k in chosen:
        s, t = (int(i) for i in split.pairs[k])
        yaw_s, yaw_t = split.rows["yaw"][s], split.rows["yaw"][t]
        rows[0].append(label_tile(to_rgb8(_decode(split.rows["image"][s])), f"src y{yaw_s:+.0f}"))
        rows[1].append(label_tile(to_rgb8(_decode(split.rows["image"][t])), f"tgt y{yaw_t:+.0f}"))
        rows[2].append(label_tile(to_rgb8(outputs[int(k)]), "output"))
    write_image(path, grid(rows))


def judge_split(
    args: argparse.Namespace,
    loaded: LoadedModel,
    split: SplitData,
    arcface: ArcFaceScorer | None,
    device: torch.device,
) -> dict[str, Any]:
    """``controlnet_ray.judging``'s report of the model and the trivial predictors on the same
    pairs (same split, pair rule and ``--max_pairs`` subset)."""
    from controlnet_ray.judging.session import prepare_judging

    cfg = split.data_config
    judging = prepare_judging(
        split.shards_dir,
        cfg.resolved_cache_dir(),
        held_splits=(args.split,),
        pair_mode=cfg.pair_mode,
        min_deg=cfg.min_pose_distance,
        max_deg=cfg.max_pose_distance,
        max_pairs=args.max_pairs,
        embed=arcface.embed if arcface is not None else None,
    )
    return judging.report(loaded.model.generate, device)
