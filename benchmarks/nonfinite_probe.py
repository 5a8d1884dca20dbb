"""Where a training step's first non-finite value appears, per batch size and precision.

Written after the first run on an H200 (torch 2.11, bf16): batch 256 trained, batch 1024 gave
a finite loss and NaN gradients from the first step, in the engine alone and in the Ray path,
while CPU runs of the same batch (fp32 and bf16) stayed finite. For each setting it runs one
forward and backward of the default model on the benchmark's uint8 batch (as ``gpu_path.py``)
and prints: the loss; the first module (in call order) whose output is non-finite; the first
module, in backward order, whose output's gradient is non-finite and the one before it (the
NaN is made between them); how many parameter tensors got non-finite gradients.
``--chunks`` also runs the same batch in that many pieces (data or batch size?); ``--no_cudnn``
repeats the first setting without cuDNN.

    python benchmarks/nonfinite_probe.py                        # cuda: 1024 512 768, bf16 + fp32
    python benchmarks/nonfinite_probe.py --device cpu --batch_size 8 --image_size 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import pick_device  # noqa: E402  (benchmarks/)
from engine import build_engine  # noqa: E402
from gpu_path import uint8_batch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from controlnet_ray.config import DataConfig, ModelConfig, OptimConfig  # noqa: E402
from controlnet_ray.data.batch import to_model_batch  # noqa: E402
from controlnet_ray.engine.batch import _forward  # noqa: E402
from controlnet_ray.engine.losses import compute_losses, pose_scale_deg  # noqa: E402


def _bad(t: object) -> bool:
    return torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())


class Tracer:
    """Forward hooks on every leaf module: non-finite outputs, and a gradient hook on each
    output that records, in backward order, whether the gradient arriving there is finite."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.forward_bad: list[str] = []
        self.backward: list[tuple[str, bool]] = []
        self.handles = [
            m.register_forward_hook(self._hook(name))
            for name, m in model.named_modules()
            if not list(m.children())
        ]

    def _hook(self, name: str):  # noqa: ANN202
        def hook(_m: torch.nn.Module, _i: object, out: object) -> None:
            outs = out if isinstance(out, (tuple, list)) else [out]
            if any(_bad(t) for t in outs):
                self.forward_bad.append(name)
            for t in outs:
                if torch.is_tensor(t) and t.requires_grad:
                    t.register_hook(lambda g, n=name: self.backward.append((n, _bad(g))))

        return hook

    def first_bad_gradient(self) -> str:
        i = next((k for k, (_, bad) in enumerate(self.backward) if bad), None)
        if i is None:
            return "none"
        before = self.backward[i - 1][0] if i else "the loss"
        return f"between {before} and {self.backward[i][0]}"

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def probe(args: argparse.Namespace, bs: int, bf16: bool, chunks: int = 1) -> None:
    device = args.device
    torch.manual_seed(0)
    engine = build_engine(ModelConfig(image_size=args.image_size), OptimConfig(), device)
    batch = to_model_batch(uint8_batch(bs, args.image_size, device))
    tracer = Tracer(engine.model)
    label = f"batch {bs} {'bf16' if bf16 else 'fp32'}"
    label += f" in {chunks} pieces" if chunks > 1 else ""
    t0 = time.perf_counter()
    lines = []
    for c in range(chunks):
        piece = {k: v[c * bs // chunks : (c + 1) * bs // chunks] for k, v in batch.items()}
        tracer.forward_bad.clear()
        tracer.backward.clear()
        engine.model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = _forward(engine.model, piece)
        terms = compute_losses(out, piece, engine.cfg, pose_scale_deg())
        terms.total.backward()
        params = [(n, p) for n, p in engine.model.named_parameters() if p.grad is not None]
        bad = [n for n, p in params if _bad(p.grad)]
        lines.append(
            f"  loss {terms.total.item():.4f}; first non-finite output: "
            f"{tracer.forward_bad[0] if tracer.forward_bad else 'none'}; first non-finite "
            f"gradient {tracer.first_bad_gradient()}; {len(bad)} of {len(params)} parameter "
            f"gradients non-finite{' (' + ', '.join(bad[:3]) + ', ...)' if bad else ''}"
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"{label} ({time.perf_counter() - t0:.1f} s)", *lines, sep="\n", flush=True)
    tracer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--batch_size", type=int, nargs="+", default=[1024, 512, 768])
    p.add_argument("--image_size", type=int, default=DataConfig.image_size)
    p.add_argument("--chunks", type=int, default=4, help="pieces of the first batch; 1: off")
    p.add_argument("--no_cudnn", action="store_true", help="repeat the first setting without cuDNN")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    cudnn = torch.backends.cudnn.version() if args.device.type == "cuda" else None
    print(f"torch {torch.__version__}, cuDNN {cudnn}, {args.device}", flush=True)
    first = args.batch_size[0]
    probe(args, first, bf16=True)
    if args.chunks > 1:
        probe(args, first, bf16=True, chunks=args.chunks)
    probe(args, first, bf16=False)
    if args.no_cudnn:
        torch.backends.cudnn.enabled = False
        print("cuDNN off:")
        probe(args, first, bf16=True)
        torch.backends.cudnn.enabled = True
    for bs in args.batch_size[1:]:
        probe(args, bs, bf16=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
