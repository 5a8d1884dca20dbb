"""Runners: one interface over a PyTorch checkpoint and an exported ONNX generator, so the
CLIs do not care which they were given; batched runs with bounded memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from controlnet_ray.inference.errors import InferenceError
from controlnet_ray.inference.loading import LoadedModel, load_model, resolve_torch_device
from controlnet_ray.inference.onnx_format import (
    META_FORMAT,
    META_FRAMING,
    META_IMAGE_SIZE,
    META_POSE_ESTIMATE,
    ONNX_FORMAT,
    ONNX_INPUTS,
    ONNX_OUTPUT,
)

if TYPE_CHECKING:
    import torch

    from controlnet_ray.data.pose import PhotoPoseModel

RUN_BATCH = 16  # images per forward pass in the CLIs


class Runner(Protocol):
    """Generator path of a model: aligned crops + poses -> images, all numpy, all [-1, 1]."""

    image_size: int
    framing: str  # how the model's training crops were framed (data.align)
    description: str
    pose_model: PhotoPoseModel  # a photo's pose, as the training data's were estimated

    def generate(
        self, images: np.ndarray, source_pose: np.ndarray, target_pose: np.ndarray
    ) -> np.ndarray: ...


class TorchRunner:
    """A ``.pth`` checkpoint run with PyTorch."""

    def __init__(self, loaded: LoadedModel, device: torch.device) -> None:
        self.loaded, self.device = loaded, device
        self.image_size = loaded.image_size
        self.framing = loaded.config.data.framing
        self.description = f"{loaded.path} (PyTorch on {device})"
        self.pose_model = _pose_model(loaded.pose_estimate, loaded.path)

    def generate(
        self, images: np.ndarray, source_pose: np.ndarray, target_pose: np.ndarray
    ) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.loaded.model.generate(
                *(_tensor(a, self.device) for a in (images, source_pose, target_pose))
            )
        return out.float().cpu().numpy()


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)


class OnnxRunner:
    """An exported ``.onnx`` generator run with onnxruntime (CUDA provider first when asked)."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        import onnxruntime as ort

        from controlnet_ray.data.detect import onnx_providers

        self.path = Path(path)
        if not self.path.is_file():
            raise InferenceError(f"--checkpoint {self.path}: file not found")
        providers = onnx_providers(device)  # DetectorError when cuda is asked for but absent
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise InferenceError(f"{self.path}: not a readable ONNX model: {exc}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        names = [i.name for i in self.session.get_inputs()]
        if meta.get(META_FORMAT) != ONNX_FORMAT or names != list(ONNX_INPUTS):
            raise InferenceError(
                f"{self.path}: not a controlnet_ray generator export (inputs {names}, metadata "
                f"{META_FORMAT}={meta.get(META_FORMAT)!r}); make one with controlnet_ray.export"
            )
        self.image_size = int(meta[META_IMAGE_SIZE])
        self.framing = meta.get(META_FRAMING, "arcface")
        self.metadata = dict(meta)
        self.pose_model = _pose_model(json.loads(meta.get(META_POSE_ESTIMATE, "null")), self.path)
        provider = self.session.get_providers()[0]
        self.description = f"{self.path} (onnxruntime, {provider})"

    def generate(
        self, images: np.ndarray, source_pose: np.ndarray, target_pose: np.ndarray
    ) -> np.ndarray:
        feed = {
            name: np.ascontiguousarray(a, dtype=np.float32)
            for name, a in zip(ONNX_INPUTS, (images, source_pose, target_pose), strict=True)
        }
        return self.session.run([ONNX_OUTPUT], feed)[0]


def _pose_model(fields: dict | None, path: Path) -> PhotoPoseModel:
    """The model's :class:`PhotoPoseModel` (the default when it has none); InferenceError
    naming the file when the stored one is malformed."""
    from controlnet_ray.data.pose import PhotoPoseModel

    try:
        return PhotoPoseModel.from_dict(fields)
    except (ValueError, TypeError) as exc:
        raise InferenceError(f"{path}: {exc}") from exc


def open_runner(path: str | Path, device: str = "auto") -> Runner:
    """``.onnx`` -> :class:`OnnxRunner`; anything else is read as a PyTorch checkpoint."""
    if Path(path).suffix.lower() == ".onnx":
        return OnnxRunner(path, device)
    torch_device = resolve_torch_device(device)
    return TorchRunner(load_model(path, torch_device), torch_device)


def run_batched(
    runner: Runner, images: np.ndarray, source_pose: np.ndarray, target_pose: np.ndarray
) -> np.ndarray:
    """``runner.generate`` in chunks of :data:`RUN_BATCH` (bounded memory for long sweeps)."""
    outs = [
        runner.generate(
            images[i : i + RUN_BATCH],
            source_pose[i : i + RUN_BATCH],
            target_pose[i : i + RUN_BATCH],
        )
        for i in range(0, len(images), RUN_BATCH)
    ]
    return np.concatenate(outs) if outs else np.zeros((0, 3, runner.image_size, runner.image_size))
