"""``benchmarks/quality.py``'s training: the budget clock, the model and its engine
(:class:`Bench`), training until the budget runs out with the held-out curve
(:class:`BudgetRun`), and the final scores of the final and the best model."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from quality_data import BenchData, train_batches
from quality_scores import Scores, evaluate_pairs, judge_final, write_samples

from controlnet_ray.config import ModelConfig, OptimConfig
from controlnet_ray.engine import AmpSettings, TrainEngine, build_optimizer, lr_factor, resolve_amp
from controlnet_ray.judging import TRIVIAL, TrivialPredictors
from controlnet_ray.model import build_model


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

    @property
    def budget(self) -> float:
        """The budget in the unit of :meth:`progress`."""
        return self.budget_s

    def progress(self) -> float:
        """How much of the budget is used, in its own unit (here: seconds of the clock)."""
        return self.elapsed()

    def describe(self) -> str:
        return f"{self.budget_s / 60:g} min ({self.name})"


class StepBudget(BudgetClock):
    """A budget of optimizer steps (``--steps``): the same run twice does the same steps.

    Under the CPU-time budget the step count, and with it the schedule's course, depends on how
    busy the machine is (1939 and 2003 steps for two runs of one seed); a step budget makes a
    run repeatable, so a difference between two runs is the recipe's or the seed's, not the
    load's. Time is still measured (``elapsed``) and reported, it just ends nothing.
    """

    def __init__(self, steps: int, device: torch.device) -> None:
        super().__init__(0.0, device)
        self.steps = steps
        self.count: Callable[[], int] = lambda: 0  # the engine's optimizer steps, set once built

    @property
    def budget(self) -> float:
        return float(self.steps)

    def progress(self) -> float:
        return float(self.count())

    def fraction(self) -> float:
        return min(1.0, self.count() / self.steps)

    def done(self) -> bool:
        return self.count() >= self.steps

    def describe(self) -> str:
        return f"{self.steps} optimizer steps (time on the {self.name} clock)"


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
    clock = (
        StepBudget(args.steps, device)
        if args.steps is not None
        else BudgetClock(args.budget_min * 60.0, device)
    )
    warm, span = max(1, int(args.warmup_frac * 10_000)), 10_000
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _step: lr_factor(int(clock.fraction() * span), warm, span)
    )
    engine = TrainEngine(model, optimizer, scheduler, ocfg, device, amp)
    if isinstance(clock, StepBudget):
        clock.count = lambda: engine.optimizer_steps
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: cnn encoder, base_channels {args.base_channels}, {n_params / 1e6:.2f} M params;"
        f" device {device}; {amp.description}; budget {clock.describe()}; "
        f"batch {args.batch_size}, lr {args.lr:g}, loss {args.loss_type}, flip {args.flip}",
        flush=True,
    )
    return Bench(model, optimizer, engine, amp, clock, device, n_params)


class BudgetRun:
    """Training until the budget runs out, scoring the subset every --eval_every budget units
    (seconds, or steps under --steps; paused out of the clock): the curve, and its best point
    by face PSNR."""

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
        eval_every = args.eval_every if args.eval_every is not None else b.clock.budget / 20
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
            if b.clock.progress() >= next_eval:
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
