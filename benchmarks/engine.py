"""Throughput of ``TrainEngine.train_micro_batch`` for the default model, Ray-free.

Measures samples/s of full training micro-steps (forward, losses, backward, clip, AdamW,
scheduler) on synthetic device-resident batches, so data loading is excluded.  On CUDA it
also reports peak memory and MFU = achieved FLOP/s / peak FLOP/s, with achieved FLOPs =
3 x forward FLOPs (``controlnet_ray.model.flops_per_sample``) x samples/s.

    python benchmarks/engine.py                 # CPU: bs 16/64; CUDA: bs 64/256; fp32 and bf16
    python benchmarks/engine.py --quick --json out.json

It fails loudly if anything imported Ray: the engine must run on a machine without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import assert_no_ray, pick_device  # noqa: E402  (benchmarks/)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from controlnet_ray.config import ModelConfig, OptimConfig  # noqa: E402
from controlnet_ray.engine import (  # noqa: E402
    TrainEngine,
    build_optimizer,
    build_scheduler,
    resolve_amp,
)

PEAK_BF16_H100 = 989e12  # H100/H200 SXM dense bf16 tensor-core FLOP/s
PEAK_FP32_H100 = 67e12  # H100/H200 SXM fp32 (non-tensor-core) FLOP/s


@dataclass
class Result:
    device: str
    batch_size: int
    precision: str
    samples_per_s: float | None
    step_ms: float | None
    peak_mem_gib: float | None
    tflops: float | None
    mfu: float | None
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--batch_sizes", type=int, nargs="+", help="default: 16 64 (cpu), 64 256 (cuda)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5, quick 1)")
    p.add_argument("--quick", action="store_true", help="a short run: few steps per setting")
    p.add_argument("--peak_bf16", type=float, default=PEAK_BF16_H100, help="peak bf16 FLOP/s")
    p.add_argument("--peak_fp32", type=float, default=PEAK_FP32_H100, help="peak fp32 FLOP/s")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write results here")
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    return args


def synthetic_batch(bs: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Device-resident random batch following the batch contract (images in [-1, 1], degrees)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = {
        "source": torch.rand(bs, 3, size, size, generator=g) * 2 - 1,
        "target": torch.rand(bs, 3, size, size, generator=g) * 2 - 1,
        "source_pose": (torch.rand(bs, 3, generator=g) - 0.5) * 120,
        "target_pose": (torch.rand(bs, 3, generator=g) - 0.5) * 120,
    }
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_engine(mcfg: ModelConfig, ocfg: OptimConfig, device: torch.device) -> TrainEngine:
    """A fresh default-seeded model on ``device`` with its optimizer, schedule and AMP, as the
    worker builds them (the schedule long enough never to reach its floor)."""
    from controlnet_ray.model import build_model

    torch.manual_seed(0)
    model = build_model(mcfg).to(device).train()
    optimizer = build_optimizer(model, ocfg)
    scheduler = build_scheduler(optimizer, ocfg, steps_per_epoch=10_000)
    return TrainEngine(model, optimizer, scheduler, ocfg, device, resolve_amp(ocfg.use_amp, device))


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> float:  # noqa: ANN001
    """Seconds for ``steps`` calls of ``step()`` after ``warmup`` untimed ones, device synced."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


def measure(
    bs: int, precision: str, device: torch.device, args: argparse.Namespace, fwd_flops: float
) -> Result:
    """Build a fresh model/optimizer, run warm-up steps, then time ``args.steps`` steps."""
    mcfg, ocfg = ModelConfig(), OptimConfig(use_amp=precision == "bf16")
    engine = build_engine(mcfg, ocfg, device)
    batch = synthetic_batch(bs, mcfg.image_size, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = timed_steps(lambda: engine.train_micro_batch(batch), args.warmup, args.steps, device)
    sps = bs * args.steps / elapsed
    tflops = 3.0 * fwd_flops * sps / 1e12 if fwd_flops else None
    mem = mfu = None
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**30
        peak = args.peak_bf16 if precision == "bf16" else args.peak_fp32
        mfu = tflops * 1e12 / peak if tflops is not None else None
    note = "" if engine.skipped_steps == 0 else f"{engine.skipped_steps} non-finite steps"
    return Result(str(device), bs, precision, sps, 1e3 * elapsed / args.steps, mem, tflops, mfu,
                  note)  # fmt: skip


def forward_flops(device: torch.device) -> float:
    """Forward FLOPs per sample from the model package, or 0 when it does not provide them."""
    import controlnet_ray.model as model_pkg

    fn = getattr(model_pkg, "flops_per_sample", None)
    if fn is None:
        return 0.0
    cfg = ModelConfig()
    return float(fn(model_pkg.build_model(cfg).to(device), cfg.image_size))


def run_one(bs: int, precision: str, device: torch.device, args, fwd_flops: float) -> Result:  # noqa: ANN001
    try:
        return measure(bs, precision, device, args, fwd_flops)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Result(str(device), bs, precision, None, None, None, None, None, "OOM")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[Result]) -> None:
    head = f"{'device':<7}{'batch':>6} {'prec':<5}{'samples/s':>11}{'ms/step':>9}"
    print(head + f"{'peak GiB':>9}{'TFLOP/s':>9}{'MFU':>7}  note")
    for r in results:
        print(
            f"{r.device:<7}{r.batch_size:>6} {r.precision:<5}{_fmt(r.samples_per_s, '.1f'):>11}"
            f"{_fmt(r.step_ms, '.1f'):>9}{_fmt(r.peak_mem_gib, '.2f'):>9}"
            f"{_fmt(r.tflops, '.2f'):>9}{_fmt(r.mfu and 100 * r.mfu, '.1f'):>6}%  {r.note}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    sizes = args.batch_sizes or ([64, 256] if device.type == "cuda" else [16, 64])
    fwd = forward_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}; threads={torch.get_num_threads()}; "
          f"fwd GFLOP/sample={fwd / 1e9:.3f}; warmup={args.warmup} steps={args.steps}")  # fmt: skip
    results = [run_one(bs, p, device, args, fwd) for bs in sizes for p in args.precisions]
    print_table(results)
    if device.type == "cuda":
        print("MFU: bf16 vs --peak_bf16, fp32 vs --peak_fp32 (cuDNN convs may use TF32, so >100%")
        print("is possible for fp32).")
    if args.json:
        meta = {"torch": torch.__version__, "device_name": name, "fwd_flops_per_sample": fwd,
                "steps": args.steps, "warmup": args.warmup}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]},
                                        indent=2))  # fmt: skip
    assert_no_ray("the engine's import chain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
