"""The product's GPU path against the engine alone, side by side, at the same config.

For each ``--batch_size``, in one process:
  engine    ``TrainEngine.train_micro_batch`` on synthetic uint8 batches already on the
            device, converted by ``data.batch.to_model_batch`` as the worker does: the rate
            the GPU consumes when nothing else limits it;
  pipeline  the Ray Data training pipeline consumed alone (no training): what it can deliver
            to the device (local Ray with all CPUs);
  ray       ``python -m controlnet_ray.train``'s path called in-process (launcher, Ray Train,
            Ray Data, 1 worker, ``--use_gpu`` on CUDA) on the embedded dataset; best epoch
            after the first, training pass only.
Printed per batch: samples/s of each and the ratios ray/engine (target >= 0.9) and
pipeline/engine (target >= 2); GPU busy % (NVML via pynvml, else sampled nvidia-smi; mean
and 90th percentile of 0.2 s samples over the phase, start-up included); peak GPU memory
(engine: torch.cuda.max_memory_allocated; ray: NVML's device-wide used memory); FLOPs per
sample of one training step counted by torch.utils.flop_counter.FlopCounterMode, MFU against
``--peak_tflops`` (default 989: H100/H200 SXM dense bf16) and the FLOP-count bound
(peak / FLOPs per sample). GPU-only figures print ``n/a`` on the CPU.

    python benchmarks/gpu_path.py                                # CUDA: bf16, batch 256 512 1024
    python benchmarks/gpu_path.py --device cpu --steps 3 --epochs 2 --batch_size 8 \\
        --image_size 64 --synthetic_identities 8 --synthetic_frames 8    # tiny CPU run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from common import pick_device  # noqa: E402  (benchmarks/)
from data_pipeline import ray_pipeline_rates  # noqa: E402
from engine import build_engine, timed_steps  # noqa: E402
from ray_overhead import ray_rate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from controlnet_ray.config import PAIR_MODES, DataConfig, TrainConfig  # noqa: E402
from controlnet_ray.data.batch import IMAGE_KEYS, POSE_KEYS, to_model_batch  # noqa: E402
from controlnet_ray.launcher import resolve_shards  # noqa: E402

PEAK_TFLOPS_BF16 = 989.0  # H100/H200 SXM dense bf16 tensor-core TFLOP/s
NA = "n/a"


class GpuSampler:
    """Device-wide GPU utilisation (%) and memory used (bytes), sampled in a thread.

    NVML sees every process on the GPU, so it covers the Ray worker too (torch's counters
    only see this process). Sources: pynvml, else ``nvidia-smi``; none on the CPU.
    """

    def __init__(self, device: torch.device, period_s: float = 0.2) -> None:
        self.index = (device.index or 0) if device.type == "cuda" else None
        self.period_s, self.busy, self.used = period_s, [], []
        self._stop = threading.Event()
        self._read = self._reader() if self.index is not None else None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _reader(self):  # noqa: ANN202
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            return lambda: (
                pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                pynvml.nvmlDeviceGetMemoryInfo(handle).used,
            )
        except Exception:  # noqa: BLE001  (no pynvml or no NVML: try nvidia-smi)
            if shutil.which("nvidia-smi") is None:
                return None
            query = ["nvidia-smi", "-i", str(self.index), "--format=csv,noheader,nounits",
                     "--query-gpu=utilization.gpu,memory.used"]  # fmt: skip

            def smi() -> tuple[float, float]:
                out = subprocess.run(query, capture_output=True, text=True, check=True).stdout
                util, mib = (float(x) for x in out.split(","))
                return util, mib * 2**20

            return smi

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                busy, used = self._read()
            except Exception as exc:  # noqa: BLE001  (a sampler must not end the benchmark)
                print(f"GPU sampling stopped: {exc}", file=sys.stderr)
                return
            self.busy.append(float(busy))
            self.used.append(float(used))

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict[str, float | None]:
        if not self.busy:
            return {"busy_mean": None, "busy_p90": None, "mem_peak_gib": None}
        p90 = statistics.quantiles(self.busy, n=10)[-1] if len(self.busy) > 1 else self.busy[0]
        return {
            "busy_mean": statistics.fmean(self.busy),
            "busy_p90": p90,
            "mem_peak_gib": max(self.used) / 2**30,
        }


def uint8_batch(bs: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch as Ray Data delivers it (uint8 ``[B, H, W, 3]`` images, degrees), on ``device``."""
    g = torch.Generator().manual_seed(0)
    images = {k: torch.randint(0, 256, (bs, size, size, 3), generator=g, dtype=torch.uint8)
              for k in IMAGE_KEYS}  # fmt: skip
    poses = {k: (torch.rand(bs, 3, generator=g) - 0.5) * 120 for k in POSE_KEYS}
    return {k: v.to(device) for k, v in (images | poses).items()}


VARIANTS = ("channels_last", "compile")


def engine_alone(
    cfg: TrainConfig, device: torch.device, args: argparse.Namespace, variant: str = "eager"
) -> dict:
    """The engine's rate, peak memory and one step's FLOPs (forward + backward + optimizer).

    ``variant``: ``eager`` (the product's default step), ``channels_last`` (model and images
    in NHWC) or ``compile`` (``torch.compile`` of the model, as ``--compile`` does; the
    warm-up steps pay for compiling). FLOPs are counted on one eager step first.
    """
    from torch.utils.flop_counter import FlopCounterMode

    bs = cfg.data.batch_size
    engine = build_engine(cfg.model, cfg.optim, device)
    raw = uint8_batch(bs, cfg.model.image_size, device)
    layout = torch.contiguous_format

    def step() -> None:
        batch = to_model_batch(raw, flip=True)
        for k in IMAGE_KEYS:
            batch[k] = batch[k].contiguous(memory_format=layout)
        engine.train_micro_batch(batch)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / bs
    if variant == "channels_last":
        layout = torch.channels_last
        engine.model.to(memory_format=layout)
    if variant == "compile":
        engine.model = torch.compile(engine.model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with GpuSampler(device) as gpu:
        elapsed = timed_steps(step, args.warmup, args.steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if variant == "eager" and args.profile:
        print_profile(step, device, bs)
    return {
        "samples_per_s": bs * args.steps / elapsed,
        "flops_per_sample": flops,
        "torch_peak_gib": peak,
        **gpu.summary(),
    }


def print_profile(step, device: torch.device, bs: int, steps: int = 3) -> None:  # noqa: ANN001
    """The top operators of ``steps`` training steps by self time on the device (CPU if none):
    what the step's time goes to, to set beside the FLOP-count bound."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile: {steps} steps at batch {bs}, top operators by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def guarded(phase: str, fn, *a) -> dict:  # noqa: ANN001
    """``fn(*a)``, or ``{"error": ...}`` if it raised: one failing phase must not cost the
    figures of the others on a machine lent for minutes."""
    try:
        return fn(*a)
    except Exception as exc:  # noqa: BLE001  (recorded and printed, never hidden)
        print(f"{phase} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():  # a failed run keeps its Ray up
            ray.shutdown()
        return {"error": f"{type(exc).__name__}: {exc}", "samples_per_s": None}


def ray_path(cfg: TrainConfig, device: torch.device, root: Path) -> dict:
    """The launcher's run in this process (1 worker), best steady epoch, GPU sampled."""
    run_cfg = dataclasses.replace(
        cfg, ray=dataclasses.replace(cfg.ray, use_gpu=device.type == "cuda")
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the engine's cached blocks would count in NVML's figure
    with GpuSampler(device) as gpu:
        rate = ray_rate(run_cfg, 1, root)
    return {"samples_per_s": rate, **gpu.summary()}


def bench_config(args: argparse.Namespace, bs: int, device: torch.device) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.batch_size = bs
    cfg.data.image_size = cfg.model.image_size = args.image_size
    cfg.data.pair_mode = args.pair_mode
    cfg.data.synthetic_identities = args.synthetic_identities
    cfg.data.synthetic_frames = args.synthetic_frames
    cfg.optim.use_amp = args.precision == "bf16"
    cfg.optim.epochs = cfg.output.save_interval = args.epochs
    cfg.output.progress, cfg.output.no_judge = "lines", True
    cfg.optim.compile = args.compile
    return cfg


def _pipeline(shards: Path, cfg: TrainConfig, epochs: int, device: torch.device) -> dict:
    rates, pairs = ray_pipeline_rates(shards, cfg.data, epochs, device)
    return {"samples_per_s": max(rates), "epochs": rates, "pairs": pairs}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def measure_batch(args: argparse.Namespace, bs: int, device: torch.device, shards: Path) -> dict:
    cfg = bench_config(args, bs, device)
    variant = "compile" if args.compile else "eager"
    engine = guarded("engine", engine_alone, cfg, device, args, variant)
    pipeline = guarded("pipeline", _pipeline, shards, cfg, args.pipeline_epochs, device)
    with tempfile.TemporaryDirectory() as tmp:
        ray = guarded("ray", ray_path, cfg, device, Path(tmp))
    peak = args.peak_tflops * 1e12
    flops = engine.get("flops_per_sample")
    cuda = device.type == "cuda" and bool(flops)
    mfu = {k: flops * r["samples_per_s"] / peak if cuda and r["samples_per_s"] else None
           for k, r in (("engine", engine), ("ray", ray))}  # fmt: skip
    return {
        "batch_size": bs,
        "pairs_per_epoch": pipeline.get("pairs"),
        "engine": engine,
        "variants": {},  # filled by main() once every batch size's product figures are in
        "pipeline": pipeline,
        "ray": ray,
        "ray_over_engine": _ratio(ray["samples_per_s"], engine["samples_per_s"]),
        "pipeline_over_engine": _ratio(pipeline["samples_per_s"], engine["samples_per_s"]),
        "mfu_engine": mfu["engine"],
        "mfu_ray": mfu["ray"],
        "flop_bound_samples_per_s": peak / flops if cuda else None,
    }


def _f(value: float | None, spec: str, unit: str = "") -> str:
    return NA if value is None else format(value, spec) + unit


def print_batch(r: dict) -> None:
    e, p, y = r["engine"], r["pipeline"], r["ray"]
    print(f"\nbatch {r['batch_size']} ({r['pairs_per_epoch']} pairs an epoch)")
    print(f"{'':<22}{'samples/s':>11}{'GPU busy % mean/p90':>22}{'peak GPU mem':>20}{'MFU':>8}")
    rows = [("engine", e, "torch", r["mfu_engine"]), ("ray", y, "NVML", r["mfu_ray"])]
    rows += [(f"engine {v}", row, "torch", None) for v, row in r["variants"].items()]
    for name, row, source, mfu in rows:
        if "error" in row:
            print(f"{name:<22}{'failed':>11}  {row['error']}")
            continue
        busy = f"{_f(row['busy_mean'], '.0f')}/{_f(row['busy_p90'], '.0f')}"
        key = "torch_peak_gib" if source == "torch" else "mem_peak_gib"
        mem = _f(row[key], ".2f", f" GiB {source}")
        pct = _f(mfu and 100 * mfu, ".1f", "%")
        print(f"{name:<22}{row['samples_per_s']:>11.1f}{busy:>22}{mem:>20}{pct:>8}")
    print(f"{'pipeline':<22}{_f(p['samples_per_s'], '>11.1f')}   (alone, no training)")
    print(
        f"ray / engine {_f(r['ray_over_engine'], '.2f')} (target >= 0.9); pipeline / engine "
        f"{_f(r['pipeline_over_engine'], '.2f')} (target >= 2)"
    )
    flops = e.get("flops_per_sample")
    bound = _f(r["flop_bound_samples_per_s"], ".0f")
    print(f"train step {_f(flops and flops / 1e9, '.3f')} GFLOP/sample (FlopCounterMode); "
          f"FLOP-count bound at --peak_tflops: {bound} samples/s")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--batch_size", type=int, nargs="+", help="default: 256 512 1024 (cuda), 16")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 cuda, fp32 cpu")
    p.add_argument("--steps", type=int, default=30, help="timed engine steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed engine steps")
    p.add_argument("--epochs", type=int, default=4, help="Ray path epochs (the first is warm-up)")
    p.add_argument("--pipeline_epochs", type=int, default=3, help="epochs of the pipeline alone")
    p.add_argument("--image_size", type=int, default=DataConfig.image_size)
    p.add_argument(
        "--pair_mode",
        default="any",
        choices=PAIR_MODES,
        help="'any': ~12x the default's pairs an epoch",
    )
    p.add_argument("--synthetic_identities", type=int, default=40)
    p.add_argument("--synthetic_frames", type=int, default=16)
    p.add_argument("--peak_tflops", type=float, default=PEAK_TFLOPS_BF16, help="for MFU")
    p.add_argument(
        "--compile",
        action="store_true",
        help="the product's --compile: the Ray path compiles, and so does the engine it is "
        "compared with",
    )
    p.add_argument(
        "--profile", action="store_true", help="print the eager step's top operators (profiler)"
    )
    p.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=VARIANTS,
        help="engine-alone variants measured beside the product's eager step",
    )
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write results here")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch pays for start-up and is not counted)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    sizes = args.batch_size or ([256, 512, 1024] if cuda else [16])
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"torch {torch.__version__} on {name}; {os.cpu_count()} CPUs; {args.precision}; "
          f"{args.image_size} px; peak {args.peak_tflops:g} TFLOP/s")  # fmt: skip
    shards = resolve_shards(bench_config(args, sizes[0], device))
    meta = {"torch": torch.__version__, "device_name": name, "args": vars(args)}
    results: list[dict] = []

    def report(r: dict) -> None:  # printed and written as each finishes: a cut run keeps them
        print_batch(r)
        sys.stdout.flush()
        if args.json:
            text = json.dumps({"meta": meta, "results": results}, indent=2, default=str)
            args.json.write_text(text)

    for bs in sizes:
        results.append(measure_batch(args, bs, device, shards))
        report(results[-1])
    for r in results if args.variants else []:  # last: compiling may take minutes
        cfg = bench_config(args, r["batch_size"], device)
        for v in args.variants:
            r["variants"][v] = guarded(v, engine_alone, cfg, device, args, v)
        report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
