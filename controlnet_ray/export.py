"""``python -m controlnet_ray.export``: the generator path of a checkpoint as a checked ONNX file.

Example::

    python -m controlnet_ray.export --checkpoint best_model.pth --out model.onnx [--opset 17]

The graph is ``(image [B,3,H,W] in [-1,1], source_pose [B,3] deg, target_pose [B,3] deg) ->
output [B,3,H,W] in [-1,1]`` (``ImageControlNet.generate``: encoder, control branch, generator;
no pose head, no identity network) with a dynamic batch axis.  The image size, the pose
convention, the input range, the training pose range and the model signature are stored in
``metadata_props`` (keys in :mod:`controlnet_ray.inference`), which ``generate`` reads.

The export is written to a temporary file, compared with PyTorch on random inputs at batch 1
and 3 with onnxruntime (CPU), and moved to ``--out`` only if the max abs difference is below
``--atol`` (1e-3, fp32); otherwise nothing is written and the exit status is 1.  TorchScript
exporter (``dynamo=False``): the dynamo exporter needs onnxscript, which is not a dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from controlnet_ray.files import publish, temp_name
from controlnet_ray.inference import (
    INPUT_RANGE,
    META_CONVENTION,
    META_FORMAT,
    META_FRAMING,
    META_IMAGE_SIZE,
    META_INPUT_RANGE,
    META_POSE_ESTIMATE,
    META_POSE_LIMITS,
    META_SIGNATURE,
    META_SOURCE,
    ONNX_FORMAT,
    ONNX_INPUTS,
    ONNX_OUTPUT,
    POSE_CONVENTION,
    POSE_LIMITS_DEG,
    InferenceError,
    check_output_path,
    run_cli,
)

if TYPE_CHECKING:
    from controlnet_ray.inference import LoadedModel

MIN_OPSET, MAX_OPSET = 14, 20  # TorchScript exporter's supported range for these ops
CHECK_BATCHES = (1, 3)
DEFAULT_ATOL = 1e-3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m controlnet_ray.export",
        description="Export a checkpoint's generator to ONNX and check it against PyTorch.",
    )
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pth)")
    p.add_argument("--out", required=True, help="ONNX file to write (its folder must exist)")
    p.add_argument("--opset", type=int, default=17, help=f"{MIN_OPSET}..{MAX_OPSET} (17)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max abs diff allowed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check inputs")
    return p


def _validate(args: argparse.Namespace) -> Path:
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise InferenceError(f"--checkpoint {ckpt}: file not found")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise InferenceError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {args.opset}")
    if not args.atol > 0:
        raise InferenceError(f"--atol must be > 0, got {args.atol}")
    out = check_output_path(args.out)
    if out.suffix.lower() != ".onnx":
        raise InferenceError(f"--out {out}: give a .onnx path")
    return out


# --------------------------------------------------------------------------- export


def export_onnx(loaded: LoadedModel, path: Path, opset: int) -> None:
    """TorchScript export of ``model.generate`` with a dynamic batch axis."""
    import torch

    class GeneratorPath(torch.nn.Module):
        """Only the generator path; the pose head and identity net are training-only."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, image, source_pose, target_pose):  # noqa: ANN001, ANN201
            return self.model.generate(image, source_pose, target_pose)

    size = loaded.image_size
    example = (torch.zeros(1, 3, size, size), torch.zeros(1, 3), torch.zeros(1, 3))
    axes = {name: {0: "batch"} for name in (*ONNX_INPUTS, ONNX_OUTPUT)}
    _register_deg2rad(opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation / tracer shape-check notes
        torch.onnx.export(
            GeneratorPath(loaded.model.cpu()).eval(),
            example,
            str(path),
            dynamo=False,
            input_names=list(ONNX_INPUTS),
            output_names=[ONNX_OUTPUT],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )


def _register_deg2rad(opset: int) -> None:
    """``aten::deg2rad`` (the model's pose encoding) as ``x * pi/180``.

    The TorchScript exporter has no symbolic for it; the multiplication is exact to fp32.
    """
    import torch

    def deg2rad(g, x):  # noqa: ANN001, ANN202 - exporter callback signature
        scale = g.op("Constant", value_t=torch.tensor(math.pi / 180.0, dtype=torch.float32))
        return g.op("Mul", x, scale)

    torch.onnx.register_custom_op_symbolic("aten::deg2rad", deg2rad, opset)


def add_metadata(path: Path, loaded: LoadedModel) -> None:
    """Image size, conventions and signature into ``metadata_props``; then ONNX's checker."""
    import onnx

    model = onnx.load(str(path))
    props = {
        META_FORMAT: ONNX_FORMAT,
        META_IMAGE_SIZE: str(loaded.image_size),
        META_FRAMING: loaded.config.data.framing,
        META_CONVENTION: POSE_CONVENTION,
        META_INPUT_RANGE: INPUT_RANGE,
        META_POSE_LIMITS: json.dumps(POSE_LIMITS_DEG),
        META_SIGNATURE: json.dumps(loaded.signature, sort_keys=True),
        META_SOURCE: loaded.path.name,
        META_POSE_ESTIMATE: json.dumps(loaded.pose_estimate),
    }
    onnx.helper.set_model_props(model, props)
    model.doc_string = "ImageControlNet generator: face image + source/target pose -> face"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def check_against_torch(
    loaded: LoadedModel, path: Path, seed: int, batches: Sequence[int] = CHECK_BATCHES
) -> dict[int, float]:
    """Max abs difference ONNX (onnxruntime CPU) vs PyTorch per batch size, random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    limits = np.array(list(POSE_LIMITS_DEG.values()), np.float32)
    diffs = {}
    for b in batches:
        size = loaded.image_size
        image = rng.uniform(-1, 1, (b, 3, size, size)).astype(np.float32)
        poses = [(rng.uniform(-1, 1, (b, 3)) * limits).astype(np.float32) for _ in range(2)]
        feed = dict(zip(ONNX_INPUTS, (image, *poses), strict=True))
        ours = session.run([ONNX_OUTPUT], feed)[0]
        ref = torch_reference(loaded, image, *poses)
        diffs[b] = float(np.max(np.abs(ours - ref)))
    return diffs


def torch_reference(
    loaded: LoadedModel, image: np.ndarray, source_pose: np.ndarray, target_pose: np.ndarray
) -> np.ndarray:
    """PyTorch's output for the same inputs (CPU, fp32)."""
    import torch

    with torch.no_grad():
        args = (torch.from_numpy(a) for a in (image, source_pose, target_pose))
        return loaded.model.cpu().generate(*args).numpy()


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, out: Path) -> int:
    from controlnet_ray.inference import load_model

    loaded = load_model(args.checkpoint, "cpu")
    tmp = temp_name(out, suffix=".onnx")
    try:
        try:
            export_onnx(loaded, tmp, args.opset)
            add_metadata(tmp, loaded)
        except OSError as exc:  # read-only or full folder: one line naming it, not a traceback
            raise InferenceError(
                f"--out {out}: cannot write in {out.parent}: {exc.strerror or exc}"
            ) from exc
        diffs = check_against_torch(loaded, tmp, args.seed)
        worst = max(diffs.values())
        detail = ", ".join(f"batch {b}: {d:.3g}" for b, d in diffs.items())
        print(f"max abs difference onnxruntime vs PyTorch: {worst:.3g} ({detail})")
        if not worst < args.atol:
            print(
                f"error: difference {worst:.3g} >= --atol {args.atol:g}; {out} not written",
                file=sys.stderr,
            )
            return 1
        publish(tmp, out)
    finally:
        with contextlib.suppress(OSError):  # clean-up must not hide the error being reported
            tmp.unlink(missing_ok=True)
    print(f"wrote {out} (opset {args.opset}, image size {loaded.image_size}, dynamic batch)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    return run_cli(argv, build_parser(), _validate, run)


if __name__ == "__main__":
    sys.exit(main())
