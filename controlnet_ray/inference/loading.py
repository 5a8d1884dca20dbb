"""Loading a training checkpoint (``.pth``) as an eval-mode model built from the config stored
in the file, never from the current machine's flags."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlnet_ray.inference.errors import InferenceError

if TYPE_CHECKING:
    import torch

    from controlnet_ray.config import ModelConfig, TrainConfig


def resolve_torch_device(name: str) -> torch.device:
    """:func:`controlnet_ray.engine.resolve_device`, its error as an InferenceError (exit 2)."""
    from controlnet_ray.engine import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as exc:
        raise InferenceError(str(exc)) from None


@dataclass
class LoadedModel:
    """An eval-mode model and the training config it was built from."""

    model: Any  # ImageControlNet
    config: TrainConfig
    path: Path
    signature: dict[str, Any]
    pose_estimate: dict[str, Any] | None = None  # the checkpoint's POSE_ESTIMATE_KEY, if any

    @property
    def image_size(self) -> int:
        return int(self.config.model.image_size)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Checkpoint -> eval-mode model on ``device``; CheckpointError naming the file otherwise.

    The architecture comes from the file's own config (legacy files: its ``args``).  Encoder
    weights are not re-read (the checkpoint holds every weight): the encoder kind is taken from
    the saved model signature, so a checkpoint keeps working where ``--encoder_weights`` is gone.
    """
    import torch

    from controlnet_ray.checkpoint import CheckpointError, check_model_compat, load_checkpoint
    from controlnet_ray.checkpoint.format import POSE_ESTIMATE_KEY
    from controlnet_ray.model import build_model, model_signature

    state = load_checkpoint(path)
    cfg = _train_config(state, Path(path))
    model_cfg = _inference_model_config(cfg.model, state, Path(path))
    cfg = dataclasses.replace(cfg, model=model_cfg)
    model = build_model(model_cfg)
    _match_iresnet_form(model, model_cfg, state["model_state_dict"])
    signature = model_signature(model_cfg)
    check_model_compat(state, model, signature)
    try:
        model.load_state_dict(state["model_state_dict"])
    except RuntimeError as exc:  # check_model_compat should have caught it; name the file
        raise CheckpointError(f"{path}: weights do not load: {exc}") from exc
    model.to(torch.device(device)).eval()
    return LoadedModel(model, cfg, Path(path), signature, state.get(POSE_ESTIMATE_KEY))


_BACKBONE = "encoder.backbone."


def _match_iresnet_form(model: Any, cfg: ModelConfig, sd: dict[str, Any]) -> None:
    """Rebuild an iresnet backbone in the form the checkpoint holds.

    Training with ``--encoder_weights`` from an InsightFace ``.onnx`` builds the BN-folded
    ("fused") iresnet, possibly with another input size and without the final feature BN;
    rebuilding from the config alone (no weights file) would give the unfused 112 px form.
    The form is read off the state dict: conv biases mean fused, the fc width gives the size.
    """
    if cfg.encoder != "iresnet" or f"{_BACKBONE}fc.weight" not in sd:
        return
    from torch import nn

    from controlnet_ray.model.encoders import IResNetEncoder
    from controlnet_ray.model.iresnet import iresnet

    fused = f"{_BACKBONE}conv1.bias" in sd
    input_size = 16 * round(math.sqrt(sd[f"{_BACKBONE}fc.weight"].shape[1] / 512))
    if not fused and input_size == model.encoder.backbone.input_size:
        return
    net = iresnet(cfg.iresnet_depth, input_size=input_size, fused=fused)
    if f"{_BACKBONE}features.weight" not in sd:
        net.features = nn.Identity()  # folded into fc by the ONNX export
    model.encoder = IResNetEncoder(cfg, net=net)


def _train_config(state: dict[str, Any], path: Path) -> TrainConfig:
    from controlnet_ray.checkpoint import CheckpointError
    from controlnet_ray.config import ConfigError, DataConfig, ModelConfig, TrainConfig

    try:
        if isinstance(state.get("config"), dict):
            return TrainConfig.from_dict(state["config"])
        args = state.get("args") or {}  # the original script's file: only its flags are known
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        model = ModelConfig(**{k: v for k, v in args.items() if k in fields and v is not None})
        return TrainConfig(data=DataConfig(image_size=model.image_size), model=model)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable config: {exc}") from exc


def _inference_model_config(cfg: ModelConfig, state: dict[str, Any], path: Path) -> ModelConfig:
    from controlnet_ray.checkpoint import CheckpointError

    signature = state.get("model_signature") or {}
    kind = signature.get("encoder") or (cfg.encoder if cfg.encoder != "auto" else None)
    if kind is None and not cfg.encoder_weights:
        kind = "cnn"  # what "auto" picks without weights
    if kind is None:
        raise CheckpointError(
            f"{path}: cannot tell which encoder the checkpoint holds (no model_signature and "
            "encoder 'auto' with --encoder_weights)"
        )
    return dataclasses.replace(cfg, encoder=kind, encoder_weights=None)
