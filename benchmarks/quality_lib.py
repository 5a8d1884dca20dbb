"""The work of ``benchmarks/quality.py`` (its docstring says what and why): ``run`` for parsed
flags, in the order data, model, training with the held-out curve, final scores, report.

The parts are its siblings: ``quality_data`` (shard rows, pairs, batches, trivial predictors,
``--export_shards``), ``quality_scores`` (PSNR, margins, samples, the judged report),
``quality_training`` (budget clock, model and engine, the budget run, final scores) and
``quality_report`` (the ``--json`` figures and the printed tables).  Imported by
``quality.main`` once the script has set ``OMP_WAIT_POLICY`` and ``sys.path``; run from
``benchmarks/`` (``common`` is its sibling).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import assert_no_ray, pick_device
from quality_data import export_shards, load_data, resolve_shards
from quality_report import build_result, print_summary
from quality_training import BudgetRun, build_bench, final_scores


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
