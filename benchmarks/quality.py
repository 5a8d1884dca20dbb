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
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/OpenMP load; see docstring

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from common import assert_no_ray, pick_device  # noqa: E402  (benchmarks/)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from controlnet_ray.config import (  # noqa: E402
    LOSS_TYPES,
    PAIR_MODES,
    DataConfig,
    ModelConfig,
    OptimConfig,
)
from controlnet_ray.data.pairs import make_pairs  # noqa: E402
from controlnet_ray.engine import (  # noqa: E402
    TrainEngine,
    build_optimizer,
    lr_factor,
    resolve_amp,
)
from controlnet_ray.judging import TRIVIAL, TrivialPredictors, fit_trivial_predictors  # noqa: E402
from controlnet_ray.judging.data import decode_rgb  # noqa: E402
from controlnet_ray.judging.predictors import BIN_DEG, pose_bin  # noqa: E402
from controlnet_ray.judging.report import format_report, summary_line  # noqa: E402
from controlnet_ray.judging.session import even_subset, prepare_judging  # noqa: E402
from controlnet_ray.metrics import (  # noqa: E402
    FACE_ELLIPSE_112,
    PSNR_MSE_FLOOR,
    face_mask,
    psnr_per_image,
    to_unit_range,
)
from controlnet_ray.model import build_model  # noqa: E402

try:
    from controlnet_ray.data.pipeline import decode_image, decode_pairs  # noqa: E402
except ModuleNotFoundError as exc:  # a bare GPU box may lack pandas, used only for annotations
    if exc.name != "pandas":
        raise
    # A placeholder only while the pipeline module loads (decode_* never touch pandas); then
    # removed again, so pyarrow's own pandas detection still sees that there is none.
    _saved = sys.modules.get("pandas")
    sys.modules["pandas"] = types.ModuleType("pandas")
    try:
        from controlnet_ray.data.pipeline import decode_image, decode_pairs  # noqa: E402
    finally:
        if _saved is None and "pandas" in sys.modules:
            del sys.modules["pandas"]
        if _saved is not None:
            sys.modules["pandas"] = _saved

PREDICTORS = ("model", *TRIVIAL)
TARGETS_DB = {"whole": 0.7, "face": 2.0}  # the targets: margin over the best trivial
_COLUMNS = ["person_name", "split", "role", "frame_index", "image", "yaw", "pitch", "roll"]


# ----------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--budget_min",
        type=float,
        default=20.0,
        help="training budget in minutes: CPU time on CPU, wall time on CUDA",
    )
    p.add_argument("--identities", type=int, default=400, help="synthetic identities (all splits)")
    p.add_argument("--frames", type=int, default=24, help="video frames per identity")
    p.add_argument("--synthetic_seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=1e-5)
    p.add_argument("--warmup_frac", type=float, default=0.03, help="warm-up share of the budget")
    p.add_argument(
        "--pair_mode",
        choices=PAIR_MODES,
        default="front_to_video",
        help="training pairs (evaluation is always front_to_video)",
    )
    p.add_argument("--min_pose_distance", type=float, default=5.0)
    p.add_argument("--max_pose_distance", type=float, default=90.0)
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
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--use_amp", action="store_true", help="bf16 autocast (see engine.resolve_amp)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument(
        "--loader_threads",
        type=int,
        default=None,
        help="decode threads (default 0 = inline on CPU, 8 on CUDA)",
    )
    p.add_argument(
        "--eval_every",
        type=float,
        default=None,
        help="budget seconds between subset evaluations (default budget / 20)",
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
    args = p.parse_args(argv)
    if args.image_size % 16:
        p.error(f"--image_size must be divisible by 16, got {args.image_size}")
    return args


# ----------------------------------------------------------------------------- budget clock


class BudgetClock:
    """Training time on the budget's clock; ``paused()`` excludes evaluation from it."""

    def __init__(self, budget_s: float, device: torch.device) -> None:
        self.budget_s = budget_s
        self.wall = device.type == "cuda"
        self.device = device
        self._excluded = 0.0
        self._start = self._now()

    def _now(self) -> float:
        return time.perf_counter() if self.wall else time.process_time()

    def elapsed(self) -> float:
        return self._now() - self._start - self._excluded

    def fraction(self) -> float:
        return min(1.0, self.elapsed() / self.budget_s) if self.budget_s > 0 else 1.0

    def done(self) -> bool:
        return self.elapsed() >= self.budget_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self.wall:
            torch.cuda.synchronize(self.device)
        t0 = self._now()
        try:
            yield
        finally:
            if self.wall:
                torch.cuda.synchronize(self.device)
            self._excluded += self._now() - t0

    @property
    def name(self) -> str:
        return "wall s (cuda)" if self.wall else "CPU s (process_time)"


# ----------------------------------------------------------------------------- data


def resolve_shards(args: argparse.Namespace) -> Path:
    """The shard directory: --shards, or the synthetic set rendered and prepared (cached)."""
    if args.shards is not None:
        return args.shards
    from controlnet_ray.data.shards import ensure_shards  # needs insightface: import lazily
    from controlnet_ray.data.synthetic import SyntheticSpec, ensure_synthetic_dataset

    data = DataConfig(
        cache_dir=args.cache_dir,
        image_size=args.image_size,
        pair_mode=args.pair_mode,
        min_pose_distance=args.min_pose_distance,
        max_pose_distance=args.max_pose_distance,
    )
    spec = SyntheticSpec(
        num_identities=args.identities, frames_per_identity=args.frames, seed=args.synthetic_seed
    )
    workers = max(1, min(2, os.cpu_count() or 1))
    data.data_dir = str(ensure_synthetic_dataset(data.resolved_cache_dir(), spec, workers))
    return ensure_shards(data, num_workers=workers)


def read_rows(shards: Path) -> dict[str, np.ndarray]:
    """All shard rows as numpy columns (pyarrow only, so it also works without insightface)."""
    manifest = json.loads((shards / "manifest.json").read_text(encoding="utf-8"))
    files = [
        shards / f for split in ("train", "val", "test") for f in manifest["shards"].get(split, [])
    ]
    if not files:
        raise SystemExit(f"no shard files listed in {shards / 'manifest.json'}")
    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    for f in files:
        table = pq.read_table(f, columns=_COLUMNS)
        for c in _COLUMNS:
            cols[c].extend(table.column(c).to_pylist())
    out = {c: np.asarray(v, dtype=object) for c, v in cols.items()}
    for c in ("yaw", "pitch", "roll"):
        out[c] = out[c].astype(np.float32)
    out["pose"] = np.stack([out["yaw"], out["pitch"], out["roll"]], 1)
    return out


def subset_rows(rows: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[keep] for k, v in rows.items()}


def pairs_of(rows: dict[str, np.ndarray], mode: str, args: argparse.Namespace) -> np.ndarray:
    return make_pairs(
        {k: rows[k] for k in ("person_name", "role", "yaw", "pitch", "roll")},
        mode=mode,
        min_deg=args.min_pose_distance,
        max_deg=args.max_pose_distance,
    )


def pair_batch(rows: dict[str, np.ndarray], idx: np.ndarray, flip: bool) -> dict[str, torch.Tensor]:
    """Decode pairs ``idx`` ([B, 2] row indices) with the pipeline's own decode_pairs."""
    src, tgt = idx[:, 0], idx[:, 1]
    raw = {
        "source": rows["image"][src],
        "target": rows["image"][tgt],
        "source_pose": list(rows["pose"][src]),
        "target_pose": list(rows["pose"][tgt]),
    }
    return {k: torch.from_numpy(v) for k, v in decode_pairs(raw, flip=flip).items()}


def train_batches(
    rows: dict[str, np.ndarray],
    pairs: np.ndarray,
    batch_size: int,
    flip: bool,
    seed: int,
    threads: int,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Endless (epoch, batch) stream: reshuffled every epoch, decoded inline or by threads."""
    rng = np.random.default_rng(seed)

    def index_batches() -> Iterator[tuple[int, np.ndarray]]:
        epoch = 0
        while True:
            order = rng.permutation(len(pairs))
            for i in range(0, len(order) - batch_size + 1, batch_size):
                yield epoch, pairs[order[i : i + batch_size]]
            epoch += 1

    if threads <= 0:
        for epoch, idx in index_batches():
            yield epoch, pair_batch(rows, idx, flip)
        return
    with cf.ThreadPoolExecutor(threads) as ex:  # cv2 releases the GIL while decoding
        pending: list[tuple[int, cf.Future]] = []
        for epoch, idx in index_batches():
            pending.append((epoch, ex.submit(pair_batch, rows, idx, flip)))
            if len(pending) > 2 * threads:
                e, fut = pending.pop(0)
                yield e, fut.result()


def trivial_predictors(
    rows: dict[str, np.ndarray], train_pairs_ftv: np.ndarray, mask: torch.Tensor
) -> TrivialPredictors:
    """``controlnet_ray.judging``'s trivial predictors fitted on the training targets (the unique
    frames of the train persons' front_to_video pairs)."""
    frames = np.unique(train_pairs_ftv[:, 1])
    images = decode_rgb(list(rows["image"][frames]))
    return fit_trivial_predictors(images, rows["pose"][frames], mask)


def bin_coverage(trivial: TrivialPredictors, target_pose: np.ndarray) -> float:
    """Share of requested poses whose (yaw, pitch) bin has training frames (else: nearest bin)."""
    hits = [pose_bin(y, p) in trivial.bins.means for y, p, _ in target_pose]
    return float(np.mean(hits)) if hits else 0.0


def export_shards(src: Path, dst: Path, quality: int) -> None:
    """Copy ``src`` to ``dst`` with images re-encoded as JPEG (``quality``) and the columns
    this script reads; the manifest is copied so ``--shards dst`` works like ``--shards src``."""
    import cv2
    import pyarrow as pa

    manifest = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    dst.mkdir(parents=True, exist_ok=True)
    errs = []
    for split in ("train", "val", "test"):
        for name in manifest["shards"].get(split, []):
            table = pq.read_table(src / name, columns=_COLUMNS)
            jpegs = []
            for png in table.column("image").to_pylist():
                bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
                ok, enc = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not ok:
                    raise RuntimeError(f"JPEG encoding failed in {name}")
                back = cv2.imdecode(enc, cv2.IMREAD_COLOR).astype(np.float64)
                errs.append(float(((back - bgr) ** 2).mean()) / 255.0**2)
                jpegs.append(enc.tobytes())
            idx = table.schema.get_field_index("image")
            table = table.set_column(idx, "image", pa.array(jpegs, type=pa.binary()))
            pq.write_table(table, dst / name, compression="none")
    manifest["alignment"] = (
        manifest.get("alignment", "") + f"; re-encoded as JPEG q{quality} "
        "by benchmarks/quality.py --export_shards"
    )
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    size = sum(f.stat().st_size for f in dst.iterdir()) / 2**20
    psnr = float(np.mean(10 * np.log10(1 / np.maximum(errs, PSNR_MSE_FLOOR))))
    print(
        f"exported {len(errs)} images to {dst} ({size:.1f} MiB); JPEG q{quality} vs the PNG "
        f"shards: mean PSNR {psnr:.1f} dB"
    )


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Scores:
    sums: dict[str, dict[str, float]] = field(
        default_factory=lambda: {p: {"whole": 0.0, "face": 0.0} for p in PREDICTORS}
    )
    n: int = 0

    def add(self, name: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        self.sums[name]["whole"] += float(psnr_per_image(pred, target).double().sum())
        self.sums[name]["face"] += float(psnr_per_image(pred, target, mask).double().sum())

    def means(self, names: tuple[str, ...] = PREDICTORS) -> dict[str, dict[str, float]]:
        return {p: {r: v / max(self.n, 1) for r, v in self.sums[p].items()} for p in names}


def margins(means: dict[str, dict[str, float]]) -> dict[str, dict[str, object]]:
    out = {}
    for region in ("whole", "face"):
        best = max(TRIVIAL, key=lambda p: means[p][region])
        margin = means["model"][region] - means[best][region]
        out[region] = {
            "best_trivial": best,
            "margin_db": margin,
            "target_db": TARGETS_DB[region],
            "met": margin >= TARGETS_DB[region],
        }
    return out


def evaluate_pairs(
    model: torch.nn.Module,
    rows: dict[str, np.ndarray],
    pairs: np.ndarray,
    trivial: TrivialPredictors | None,
    mask: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    batch_size: int,
) -> Scores:
    """PSNR sums of the model (and of the trivial predictors when ``trivial`` is given)."""
    scores = Scores()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            idx = pairs[i : i + batch_size]
            b = pair_batch(rows, idx, flip=False)
            src, tgt = b["source"].to(device), b["target"].to(device)
            ctx = (
                torch.autocast(device.type, dtype=amp_dtype)
                if amp_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                out = model.generate(src, b["source_pose"].to(device), b["target_pose"].to(device))
            scores.add("model", out.float(), tgt, mask)
            if trivial is not None:
                poses = (b["source_pose"].to(device), b["target_pose"].to(device))
                for name, predict in trivial.as_dict().items():
                    scores.add(name, predict(src, *poses), tgt, mask)
            scores.n += len(idx)
    model.train(was_training)
    return scores


def write_samples(
    path: Path,
    model: torch.nn.Module,
    rows: dict[str, np.ndarray],
    pairs: np.ndarray,
    trivial: TrivialPredictors,
    device: torch.device,
) -> None:
    """One row per pair: source | target | pose-bin mean | model output (PNG via OpenCV)."""
    import cv2

    b = pair_batch(rows, pairs, flip=False)
    model.eval()
    with torch.no_grad():
        out = (
            model.generate(
                b["source"].to(device), b["source_pose"].to(device), b["target_pose"].to(device)
            )
            .float()
            .cpu()
        )
    binned = trivial.pose_bin(b["source"], b["source_pose"], b["target_pose"])
    grid = torch.cat(
        [
            torch.cat([b["source"][i], b["target"][i], binned[i], out[i]], dim=2)
            for i in range(len(pairs))
        ],
        dim=1,
    )
    img = (to_unit_range(grid).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


# ----------------------------------------------------------------------------- main


def fmt_table(means: dict[str, dict[str, float]], marg: dict[str, dict[str, object]]) -> str:
    lines = [f"{'predictor':<28}{'whole PSNR':>12}{'face PSNR':>12}", "-" * 52]
    labels = {
        "model": "model",
        "source": "output = source",
        "mean": "output = mean train target",
        "pose_bin": "output = pose-bin mean",
        "pose_bin_colour": "  same, source's colours",
    }
    for p in PREDICTORS:
        lines.append(f"{labels[p]:<28}{means[p]['whole']:>12.2f}{means[p]['face']:>12.2f}")
    lines.append("-" * 52)
    w, f = marg["whole"], marg["face"]
    label = "margin over best trivial"
    lines.append(f"{label:<28}{w['margin_db']:>+12.2f}{f['margin_db']:>+12.2f}")
    lines.append(f"{'  (best trivial)':<28}{w['best_trivial']:>12}{f['best_trivial']:>12}")
    met = [f">= +{m['target_db']:.1f} {'yes' if m['met'] else 'no'}" for m in (w, f)]
    lines.append(f"{'  target / met':<28}{met[0]:>12}{met[1]:>12}")
    return "\n".join(lines)


def judge_final(
    args: argparse.Namespace, shards: Path, model: torch.nn.Module, device: torch.device
) -> dict:
    """The full judged report (``controlnet_ray.judging``) of ``model`` on the held-out pairs,
    with the pose judge trained on (or loaded for) these shards' train persons."""
    cache = DataConfig(cache_dir=args.cache_dir).resolved_cache_dir()
    judging = prepare_judging(
        shards,
        cache,
        min_deg=args.min_pose_distance,
        max_deg=args.max_pose_distance,
        max_pairs=args.eval_max_pairs or 0,
    )
    model.eval()
    report = judging.report(model.generate, device)
    report.pop("per_image")  # the figures, not 10^4 per-image values, go to --json
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    loader_threads = (
        args.loader_threads
        if args.loader_threads is not None
        else (8 if device.type == "cuda" else 0)
    )
    t_wall0, t_cpu0 = time.perf_counter(), time.process_time()

    # ---- data
    shards = resolve_shards(args)
    if args.export_shards is not None:
        export_shards(shards, args.export_shards, args.export_jpeg_quality)
        return {"exported": str(args.export_shards)}
    rows = read_rows(shards)
    size = decode_image(rows["image"][0]).shape[-1]
    if size != args.image_size:
        raise SystemExit(f"shards in {shards} are {size} px but --image_size is {args.image_size}")
    split = rows["split"]
    train_rows = subset_rows(rows, split == "train")
    held_rows = subset_rows(rows, split != "train")
    train_pairs = pairs_of(train_rows, args.pair_mode, args)
    train_ftv = (
        train_pairs
        if args.pair_mode == "front_to_video"
        else pairs_of(train_rows, "front_to_video", args)
    )
    eval_pairs = pairs_of(held_rows, "front_to_video", args)
    rng = np.random.default_rng(args.seed)
    if args.eval_max_pairs is not None:  # the judged report below takes the same subset
        eval_pairs = even_subset(eval_pairs, args.eval_max_pairs)
    val_idx = np.flatnonzero(held_rows["split"][eval_pairs[:, 0]] == "val")
    val_idx = val_idx if len(val_idx) else np.arange(len(eval_pairs))
    subset = eval_pairs[np.sort(rng.choice(val_idx, min(args.eval_subset, len(val_idx)), False))]
    persons = {s: len(set(rows["person_name"][split == s])) for s in ("train", "val", "test")}
    mask = face_mask(args.image_size)
    trivial = trivial_predictors(train_rows, train_ftv, mask)
    prep = {"wall_s": time.perf_counter() - t_wall0, "cpu_s": time.process_time() - t_cpu0}
    data_info = {
        "shards": str(shards),
        "persons": persons,
        "train_pairs": int(len(train_pairs)),
        "eval_pairs": int(len(eval_pairs)),
        "eval_subset_pairs": int(len(subset)),
        "trivial_frames": trivial.frames,
        "pose_bins": len(trivial.bins.means),
        "face_mask_fraction": float(mask.float().mean()),
    }
    print(
        f"data: {shards}\n  persons {persons}; train pairs ({args.pair_mode}) "
        f"{len(train_pairs)}; held-out front_to_video pairs {len(eval_pairs)} "
        f"(subset {len(subset)} of val persons for the curve); "
        f"prep {prep['cpu_s']:.0f} CPU s / {prep['wall_s']:.0f} wall s",
        flush=True,
    )

    # ---- model and engine
    mcfg = ModelConfig(
        image_size=args.image_size,
        base_channels=args.base_channels,
        feature_dim=args.feature_dim,
        num_control_layers=args.num_control_layers,
        encoder="cnn",
    )
    ocfg = OptimConfig(
        lr=args.lr,
        weight_decay=args.weight_decay,
        loss_type=args.loss_type,
        pose_loss_weight=args.pose_loss_weight,
        use_amp=args.use_amp,
    )
    model = build_model(mcfg).to(device).train()
    optimizer = build_optimizer(model, ocfg)
    amp = resolve_amp(args.use_amp, device)
    amp_dtype = amp.dtype if amp.enabled else None
    clock = BudgetClock(args.budget_min * 60.0, device)
    warm, span = max(1, int(args.warmup_frac * 10_000)), 10_000
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _step: lr_factor(int(clock.fraction() * span), warm, span)
    )
    engine = TrainEngine(model, optimizer, scheduler, ocfg, device, amp)
    n_params = sum(p.numel() for p in model.parameters())
    eval_every = args.eval_every if args.eval_every is not None else clock.budget_s / 20
    print(
        f"model: cnn encoder, base_channels {args.base_channels}, {n_params / 1e6:.2f} M params;"
        f" device {device}; {amp.description}; budget {clock.budget_s:.0f} {clock.name}; "
        f"batch {args.batch_size}, lr {args.lr:g}, loss {args.loss_type}, flip {args.flip}",
        flush=True,
    )

    # ---- train
    curve, best = [], None
    loss_sum, loss_n, samples, epoch = 0.0, 0, 0, 0
    next_eval = eval_every
    eval_clock = {"cpu_s": 0.0, "wall_s": 0.0}
    subset_trivial = evaluate_pairs(
        model, held_rows, subset, trivial, mask, device, amp_dtype, args.eval_batch_size
    ).means(TRIVIAL)
    subset_best = {r: max(v[r] for v in subset_trivial.values()) for r in ("whole", "face")}
    print(
        "  subset trivial PSNR (whole/face): "
        + ", ".join(f"{k} {v['whole']:.2f}/{v['face']:.2f}" for k, v in subset_trivial.items()),
        flush=True,
    )

    def run_subset_eval() -> None:
        nonlocal loss_sum, loss_n, best
        c0, w0 = time.process_time(), time.perf_counter()
        with clock.paused():
            m = evaluate_pairs(
                model, held_rows, subset, None, mask, device, amp_dtype, args.eval_batch_size
            ).means(("model",))["model"]
            point = {
                "t": round(clock.elapsed(), 1),
                "steps": engine.optimizer_steps,
                "samples": samples,
                "epochs": round(samples / len(train_pairs), 3),
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / max(loss_n, 1),
                "subset_psnr_whole": m["whole"],
                "subset_psnr_face": m["face"],
                "subset_margin_whole": m["whole"] - subset_best["whole"],
                "subset_margin_face": m["face"] - subset_best["face"],
            }
            curve.append(point)
            if best is None or m["face"] > best["subset_psnr_face"]:
                best = dict(point, state=copy.deepcopy(model.state_dict()))
        eval_clock["cpu_s"] += time.process_time() - c0
        eval_clock["wall_s"] += time.perf_counter() - w0
        print(
            f"  [{point['t']:7.1f} {clock.name.split()[0]}-s] step {point['steps']:6d} "
            f"epoch {point['epochs']:6.2f} loss {point['train_loss']:.4f} "
            f"lr {point['lr']:.2e} | subset PSNR whole {m['whole']:.2f} face {m['face']:.2f} "
            f"(margin {point['subset_margin_whole']:+.2f} / {point['subset_margin_face']:+.2f})",
            flush=True,
        )
        loss_sum, loss_n = 0.0, 0
        if args.json:  # partial figures, in case the run is cut off
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps({"partial": True, "curve": curve}, indent=1), encoding="utf-8"
            )

    stream = train_batches(
        train_rows, train_pairs, args.batch_size, args.flip, args.seed, loader_threads
    )
    train_w0 = time.perf_counter()
    while not clock.done():
        epoch, batch = next(stream)
        step = engine.train_micro_batch(batch)
        samples += step.batch_size
        if not step.skipped:
            loss_sum, loss_n = loss_sum + step.image_loss, loss_n + 1
        if clock.elapsed() >= next_eval:
            run_subset_eval()
            next_eval += eval_every
    stream.close()
    train_time = clock.elapsed()
    train_wall = time.perf_counter() - train_w0 - eval_clock["wall_s"]
    if not curve or curve[-1]["steps"] != engine.optimizer_steps:
        run_subset_eval()  # the end point of the curve

    # ---- final evaluation on every held-out pair
    c0, w0 = time.process_time(), time.perf_counter()
    final = evaluate_pairs(
        model, held_rows, eval_pairs, trivial, mask, device, amp_dtype, args.eval_batch_size
    )
    final_means = final.means()
    judged = judge_final(args, shards, model, device)  # the final model, before "best" loads
    if args.samples:  # the final model, before the best checkpoint is loaded below
        write_samples(
            args.samples, model, held_rows, subset[:: max(1, len(subset) // 8)][:8], trivial, device
        )
    best_means = None
    if best is not None and best["steps"] != engine.optimizer_steps:
        model.load_state_dict(best["state"])
        best_means = evaluate_pairs(
            model, held_rows, eval_pairs, None, mask, device, amp_dtype, args.eval_batch_size
        ).means(("model",))
        best_means = {**final_means, "model": best_means["model"]}
    elif best is not None:
        best_means = final_means
    eval_clock["cpu_s"] += time.process_time() - c0
    eval_clock["wall_s"] += time.perf_counter() - w0

    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "budget_clock": clock.name,
        "data": data_info,
        "face_ellipse_112": FACE_ELLIPSE_112,
        "pose_bin_deg": BIN_DEG,
        "model_params": n_params,
        "timing": {
            "prep": prep,
            "train_budget_s": clock.budget_s,
            "train_clock_s": train_time,
            "train_wall_s": train_wall,
            "eval": eval_clock,
            "total_wall_s": time.perf_counter() - t_wall0,
            "total_cpu_s": time.process_time() - t_cpu0,
        },
        "training": {
            "optimizer_steps": engine.optimizer_steps,
            "samples": samples,
            "epochs": samples / len(train_pairs),
            "skipped_steps": engine.skipped_steps,
            "samples_per_clock_s": samples / max(train_time, 1e-9),
        },
        "final": {
            "psnr": final_means,
            "margins": margins(final_means),
            "pose_bin_coverage": bin_coverage(trivial, held_rows["pose"][eval_pairs[:, 1]]),
        },
        "best": (
            None
            if best is None
            else {
                "selected_at": {k: v for k, v in best.items() if k != "state"},
                "psnr": best_means,
                "margins": margins(best_means),
            }
        ),
        "judged": judged,
        "subset_trivial_psnr": subset_trivial,
        "curve": curve,
    }
    print(
        f"\ntrained {clock.budget_s / 60:g} min ({clock.name}): {engine.optimizer_steps} steps, "
        f"{samples} samples = {result['training']['epochs']:.2f} epochs; held-out: "
        f"{persons['val'] + persons['test']} persons, {len(eval_pairs)} front->video pairs"
    )
    print("\nFINAL model (end of budget), PSNR dB on held-out identities:")
    print(fmt_table(final_means, result["final"]["margins"]))
    if best is not None and best_means is not final_means:
        sel = result["best"]["selected_at"]
        print(
            f"\nBEST subset checkpoint (at {sel['t']:.0f} s, epoch {sel['epochs']:.2f}; "
            "selected on val-person pairs that are part of the held-out set):"
        )
        print(fmt_table(best_means, result["best"]["margins"]))
    print("\nJUDGED final model (controlnet_ray.judging, the same held-out pairs):")
    print(format_report(judged))
    print(summary_line(judged))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"\nwrote {args.json}")
    assert_no_ray("the quality benchmark")
    return result


if __name__ == "__main__":
    main()
