"""The work of ``benchmarks/quality.py`` (its docstring says what and why): data, the budget
clock, training with the held-out curve, the final scores and the report.

Imported by ``quality.main`` once the script has set ``OMP_WAIT_POLICY`` and ``sys.path``; run
from ``benchmarks/`` (``common`` is its sibling).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import json
import os
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from common import assert_no_ray, pick_device

from controlnet_ray.config import DataConfig, ModelConfig, OptimConfig
from controlnet_ray.data.pairs import make_pairs
from controlnet_ray.engine import AmpSettings, TrainEngine, build_optimizer, lr_factor, resolve_amp
from controlnet_ray.judging import TRIVIAL, TrivialPredictors, fit_trivial_predictors
from controlnet_ray.judging.data import decode_rgb
from controlnet_ray.judging.predictors import BIN_DEG, pose_bin
from controlnet_ray.judging.report import format_report, summary_line
from controlnet_ray.judging.session import even_subset, prepare_judging
from controlnet_ray.metrics import (
    FACE_ELLIPSE_112,
    PSNR_MSE_FLOOR,
    face_mask,
    psnr_per_image,
    to_unit_range,
)
from controlnet_ray.model import build_model

try:
    from controlnet_ray.data.pipeline import decode_image, decode_pairs
except ModuleNotFoundError as exc:  # a bare GPU box may lack pandas, used only for annotations
    if exc.name != "pandas":
        raise
    # A placeholder only while the pipeline module loads (decode_* never touch pandas); then
    # removed again, so pyarrow's own pandas detection still sees that there is none.
    _saved = sys.modules.get("pandas")
    sys.modules["pandas"] = types.ModuleType("pandas")
    try:
        from controlnet_ray.data.pipeline import decode_image, decode_pairs
    finally:
        if _saved is None and "pandas" in sys.modules:
            del sys.modules["pandas"]
        if _saved is not None:
            sys.modules["pandas"] = _saved

PREDICTORS = ("model", *TRIVIAL)
TARGETS_DB = {"whole": 0.7, "face": 2.0}  # the targets: margin over the best trivial
_COLUMNS = ["person_name", "split", "role", "frame_index", "image", "yaw", "pitch", "roll"]


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


# ----------------------------------------------------------------------------- report


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
    lines.append(f"{'  (best trivial)':<28} {w['best_trivial']:>12} {f['best_trivial']:>12}")
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


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark for parsed flags (see ``quality.parse_args``)."""
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = (time.perf_counter(), time.process_time())
    shards = resolve_shards(args)
    if args.export_shards is not None:
        export_shards(shards, args.export_shards, args.export_jpeg_quality)
        return {"exported": str(args.export_shards)}
    data = load_data(args, shards, start)
    bench = build_bench(args, device)
    budget_run = BudgetRun(args, data, bench)
    budget_run.train()
    final = final_scores(args, data, bench, budget_run)
    result = build_result(args, data, bench, budget_run, final, start)
    print_summary(result, data, bench, final)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"\nwrote {args.json}")
    assert_no_ray("the quality benchmark")
    return result


# ----------------------------------------------------------------------------- run: data


@dataclass
class BenchData:
    """The rows, the pairs trained and scored on, and the trivial predictors."""

    shards: Path
    train_rows: dict[str, np.ndarray]
    held_rows: dict[str, np.ndarray]
    train_pairs: np.ndarray
    eval_pairs: np.ndarray  # held-out front_to_video pairs (the final scores)
    subset: np.ndarray  # val persons' pairs among them (the curve during training)
    persons: dict[str, int]
    mask: torch.Tensor
    trivial: TrivialPredictors
    prep: dict[str, float]
    info: dict[str, Any]


def load_data(args: argparse.Namespace, shards: Path, start: tuple[float, float]) -> BenchData:
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
    eval_pairs, subset = held_out_pairs(args, held_rows)
    persons = {s: len(set(rows["person_name"][split == s])) for s in ("train", "val", "test")}
    mask = face_mask(args.image_size)
    trivial = trivial_predictors(train_rows, train_ftv, mask)
    prep = {"wall_s": time.perf_counter() - start[0], "cpu_s": time.process_time() - start[1]}
    data = BenchData(
        shards, train_rows, held_rows, train_pairs, eval_pairs, subset, persons, mask, trivial,
        prep, {},
    )  # fmt: skip
    data.info = data_info(data)
    print_data(args, data)
    return data


def held_out_pairs(
    args: argparse.Namespace, held_rows: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The held-out front_to_video pairs (capped by --eval_max_pairs) and the curve's subset
    of them: --eval_subset pairs of the val persons (all held-out pairs when there are none)."""
    eval_pairs = pairs_of(held_rows, "front_to_video", args)
    rng = np.random.default_rng(args.seed)
    if args.eval_max_pairs is not None:  # the judged report below takes the same subset
        eval_pairs = even_subset(eval_pairs, args.eval_max_pairs)
    val_idx = np.flatnonzero(held_rows["split"][eval_pairs[:, 0]] == "val")
    val_idx = val_idx if len(val_idx) else np.arange(len(eval_pairs))
    subset = eval_pairs[np.sort(rng.choice(val_idx, min(args.eval_subset, len(val_idx)), False))]
    return eval_pairs, subset


def data_info(data: BenchData) -> dict[str, Any]:
    return {
        "shards": str(data.shards),
        "persons": data.persons,
        "train_pairs": int(len(data.train_pairs)),
        "eval_pairs": int(len(data.eval_pairs)),
        "eval_subset_pairs": int(len(data.subset)),
        "trivial_frames": data.trivial.frames,
        "pose_bins": len(data.trivial.bins.means),
        "face_mask_fraction": float(data.mask.float().mean()),
    }


def print_data(args: argparse.Namespace, data: BenchData) -> None:
    print(
        f"data: {data.shards}\n  persons {data.persons}; train pairs ({args.pair_mode}) "
        f"{len(data.train_pairs)}; held-out front_to_video pairs {len(data.eval_pairs)} "
        f"(subset {len(data.subset)} of val persons for the curve); "
        f"prep {data.prep['cpu_s']:.0f} CPU s / {data.prep['wall_s']:.0f} wall s",
        flush=True,
    )


# ----------------------------------------------------------------------------- run: model


@dataclass
class Bench:
    """The model, its engine, and the clock its learning rate follows."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    engine: TrainEngine
    amp: AmpSettings
    clock: BudgetClock
    device: torch.device
    n_params: int

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.amp.dtype if self.amp.enabled else None


def build_bench(args: argparse.Namespace, device: torch.device) -> Bench:
    """A cnn-encoder ImageControlNet and its engine; the learning rate follows the budget."""
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
    clock = BudgetClock(args.budget_min * 60.0, device)
    warm, span = max(1, int(args.warmup_frac * 10_000)), 10_000
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _step: lr_factor(int(clock.fraction() * span), warm, span)
    )
    engine = TrainEngine(model, optimizer, scheduler, ocfg, device, amp)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: cnn encoder, base_channels {args.base_channels}, {n_params / 1e6:.2f} M params;"
        f" device {device}; {amp.description}; budget {clock.budget_s:.0f} {clock.name}; "
        f"batch {args.batch_size}, lr {args.lr:g}, loss {args.loss_type}, flip {args.flip}",
        flush=True,
    )
    return Bench(model, optimizer, engine, amp, clock, device, n_params)


# ----------------------------------------------------------------------------- run: training


class BudgetRun:
    """Training until the budget clock runs out, scoring the subset every --eval_every budget
    seconds (paused out of the clock): the curve, and its best point by face PSNR."""

    def __init__(self, args: argparse.Namespace, data: BenchData, bench: Bench) -> None:
        self.args, self.data, self.bench = args, data, bench
        self.curve: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.loss_sum, self.loss_n, self.samples = 0.0, 0, 0
        self.eval_clock = {"cpu_s": 0.0, "wall_s": 0.0}
        self.train_time = self.train_wall = 0.0
        self.subset_trivial = self.score(data.subset, data.trivial).means(TRIVIAL)
        self.subset_best = {
            r: max(v[r] for v in self.subset_trivial.values()) for r in ("whole", "face")
        }
        print(
            "  subset trivial PSNR (whole/face): "
            + ", ".join(
                f"{k} {v['whole']:.2f}/{v['face']:.2f}" for k, v in self.subset_trivial.items()
            ),
            flush=True,
        )

    def score(self, pairs: np.ndarray, trivial: TrivialPredictors | None) -> Scores:
        b, d = self.bench, self.data
        return evaluate_pairs(
            b.model, d.held_rows, pairs, trivial, d.mask, b.device, b.amp_dtype,
            self.args.eval_batch_size,
        )  # fmt: skip

    def train(self) -> None:
        args, d, b = self.args, self.data, self.bench
        eval_every = args.eval_every if args.eval_every is not None else b.clock.budget_s / 20
        next_eval = eval_every
        stream = train_batches(
            d.train_rows, d.train_pairs, args.batch_size, args.flip, args.seed, self._threads()
        )
        train_w0 = time.perf_counter()
        while not b.clock.done():
            _epoch, batch = next(stream)
            step = b.engine.train_micro_batch(batch)
            self.samples += step.batch_size
            if not step.skipped:
                self.loss_sum, self.loss_n = self.loss_sum + step.image_loss, self.loss_n + 1
            if b.clock.elapsed() >= next_eval:
                self.subset_eval()
                next_eval += eval_every
        stream.close()
        self.train_time = b.clock.elapsed()
        self.train_wall = time.perf_counter() - train_w0 - self.eval_clock["wall_s"]
        if not self.curve or self.curve[-1]["steps"] != b.engine.optimizer_steps:
            self.subset_eval()  # the end point of the curve

    def _threads(self) -> int:
        """Decode threads: --loader_threads, else inline on CPU and 8 on CUDA."""
        if self.args.loader_threads is not None:
            return self.args.loader_threads
        return 8 if self.bench.device.type == "cuda" else 0

    def subset_eval(self) -> None:
        """One point of the curve (its time is the eval clock's, not the budget's)."""
        c0, w0 = time.process_time(), time.perf_counter()
        with self.bench.clock.paused():
            m = self.score(self.data.subset, None).means(("model",))["model"]
            point = self._point(m)
            self.curve.append(point)
            if self.best is None or m["face"] > self.best["subset_psnr_face"]:
                self.best = dict(point, state=copy.deepcopy(self.bench.model.state_dict()))
        self.eval_clock["cpu_s"] += time.process_time() - c0
        self.eval_clock["wall_s"] += time.perf_counter() - w0
        self._print_point(point, m)
        self.loss_sum, self.loss_n = 0.0, 0
        if self.args.json:  # partial figures, in case the run is cut off
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(
                json.dumps({"partial": True, "curve": self.curve}, indent=1), encoding="utf-8"
            )

    def _point(self, m: dict[str, float]) -> dict[str, Any]:
        b = self.bench
        return {
            "t": round(b.clock.elapsed(), 1),
            "steps": b.engine.optimizer_steps,
            "samples": self.samples,
            "epochs": round(self.samples / len(self.data.train_pairs), 3),
            "lr": b.optimizer.param_groups[0]["lr"],
            "train_loss": self.loss_sum / max(self.loss_n, 1),
            "subset_psnr_whole": m["whole"],
            "subset_psnr_face": m["face"],
            "subset_margin_whole": m["whole"] - self.subset_best["whole"],
            "subset_margin_face": m["face"] - self.subset_best["face"],
        }

    def _print_point(self, point: dict[str, Any], m: dict[str, float]) -> None:
        print(
            f"  [{point['t']:7.1f} {self.bench.clock.name.split()[0]}-s] step {point['steps']:6d} "
            f"epoch {point['epochs']:6.2f} loss {point['train_loss']:.4f} "
            f"lr {point['lr']:.2e} | subset PSNR whole {m['whole']:.2f} face {m['face']:.2f} "
            f"(margin {point['subset_margin_whole']:+.2f} / {point['subset_margin_face']:+.2f})",
            flush=True,
        )


# ----------------------------------------------------------------------------- run: final


@dataclass
class FinalScores:
    final: dict[str, dict[str, float]]  # every predictor, the final model
    best: dict[str, dict[str, float]] | None  # the same with the curve's best model
    judged: dict[str, Any]


def final_scores(
    args: argparse.Namespace, data: BenchData, bench: Bench, run: BudgetRun
) -> FinalScores:
    """Every held-out pair scored for the final model (and the trivial predictors), the judged
    report and --samples of it; then the curve's best model, when it is another one."""
    c0, w0 = time.process_time(), time.perf_counter()
    final_means = run.score(data.eval_pairs, data.trivial).means()
    judged = judge_final(args, data.shards, bench.model, bench.device)  # before "best" loads
    if args.samples:  # the final model, before the best checkpoint is loaded below
        picked = data.subset[:: max(1, len(data.subset) // 8)][:8]
        write_samples(args.samples, bench.model, data.held_rows, picked, data.trivial, bench.device)
    best_means = None
    if run.best is not None and run.best["steps"] != bench.engine.optimizer_steps:
        bench.model.load_state_dict(run.best["state"])
        best_model = run.score(data.eval_pairs, None).means(("model",))
        best_means = {**final_means, "model": best_model["model"]}
    elif run.best is not None:
        best_means = final_means
    run.eval_clock["cpu_s"] += time.process_time() - c0
    run.eval_clock["wall_s"] += time.perf_counter() - w0
    return FinalScores(final_means, best_means, judged)


# ----------------------------------------------------------------------------- run: result


def build_result(
    args: argparse.Namespace,
    data: BenchData,
    bench: Bench,
    run: BudgetRun,
    scores: FinalScores,
    start: tuple[float, float],
) -> dict[str, Any]:
    """Every figure, as ``--json`` writes it."""
    device = bench.device
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "budget_clock": bench.clock.name,
        "data": data.info,
        "face_ellipse_112": FACE_ELLIPSE_112,
        "pose_bin_deg": BIN_DEG,
        "model_params": bench.n_params,
        "timing": _timing(data, bench, run, start),
        "training": _training(data, bench, run),
        "final": {
            "psnr": scores.final,
            "margins": margins(scores.final),
            "pose_bin_coverage": bin_coverage(
                data.trivial, data.held_rows["pose"][data.eval_pairs[:, 1]]
            ),
        },
        "best": _best(run, scores),
        "judged": scores.judged,
        "subset_trivial_psnr": run.subset_trivial,
        "curve": run.curve,
    }


def _timing(
    data: BenchData, bench: Bench, run: BudgetRun, start: tuple[float, float]
) -> dict[str, Any]:
    return {
        "prep": data.prep,
        "train_budget_s": bench.clock.budget_s,
        "train_clock_s": run.train_time,
        "train_wall_s": run.train_wall,
        "eval": run.eval_clock,
        "total_wall_s": time.perf_counter() - start[0],
        "total_cpu_s": time.process_time() - start[1],
    }


def _training(data: BenchData, bench: Bench, run: BudgetRun) -> dict[str, Any]:
    engine = bench.engine
    return {
        "optimizer_steps": engine.optimizer_steps,
        "samples": run.samples,
        "epochs": run.samples / len(data.train_pairs),
        "skipped_steps": engine.skipped_steps,
        "samples_per_clock_s": run.samples / max(run.train_time, 1e-9),
    }


def _best(run: BudgetRun, scores: FinalScores) -> dict[str, Any] | None:
    if run.best is None:
        return None
    return {
        "selected_at": {k: v for k, v in run.best.items() if k != "state"},
        "psnr": scores.best,
        "margins": margins(scores.best),
    }


def print_summary(
    result: dict[str, Any], data: BenchData, bench: Bench, scores: FinalScores
) -> None:
    clock, persons = bench.clock, data.persons
    print(
        f"\ntrained {clock.budget_s / 60:g} min ({clock.name}): "
        f"{bench.engine.optimizer_steps} steps, "
        f"{result['training']['samples']} samples = {result['training']['epochs']:.2f} epochs; "
        f"held-out: {persons['val'] + persons['test']} persons, "
        f"{len(data.eval_pairs)} front->video pairs"
    )
    print("\nFINAL model (end of budget), PSNR dB on held-out identities:")
    print(fmt_table(scores.final, result["final"]["margins"]))
    if scores.best is not None and scores.best is not scores.final:
        sel = result["best"]["selected_at"]
        print(
            f"\nBEST subset checkpoint (at {sel['t']:.0f} s, epoch {sel['epochs']:.2f}; "
            "selected on val-person pairs that are part of the held-out set):"
        )
        print(fmt_table(scores.best, result["best"]["margins"]))
    print("\nJUDGED final model (controlnet_ray.judging, the same held-out pairs):")
    print(format_report(scores.judged))
    print(summary_line(scores.judged))
