"""``benchmarks/quality.py``'s report: every figure as ``--json`` writes it, and the printed
tables and summary."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from quality_data import BenchData, bin_coverage
from quality_scores import PREDICTORS, margins
from quality_training import Bench, BudgetRun, FinalScores

from controlnet_ray.judging.predictors import BIN_DEG
from controlnet_ray.judging.report import format_report, summary_line
from controlnet_ray.metrics import FACE_ELLIPSE_112


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
    steps = getattr(bench.clock, "steps", None)  # a --steps budget
    return {
        "prep": data.prep,
        "train_budget_s": None if steps is not None else bench.clock.budget_s,
        "train_budget_steps": steps,
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
        f"\ntrained {clock.describe()}: "
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
