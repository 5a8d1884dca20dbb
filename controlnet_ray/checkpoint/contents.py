"""Building a file's contents: the weights_only-safe dict saved, its content digest and the
finite check on weights; the one DDP unwrap (the engine needs it too)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from controlnet_ray.checkpoint.format import (
    CONTENT_DIGEST_KEY,
    DISC_KEY,
    DISC_OPTIMIZER_KEY,
    FORMAT_VERSION,
    POSE_ESTIMATE_KEY,
    CheckpointError,
    _listed,
)
from controlnet_ray.checkpoint.rng import capture_rng_state
from controlnet_ray.config import TrainConfig


def legacy_args(cfg: TrainConfig) -> dict[str, Any]:
    """The original script's flags as the flat dict it stored under ``args``."""
    d, m, o, out = cfg.data, cfg.model, cfg.optim, cfg.output
    return {
        "data_dir": d.data_dir,
        "image_dir": d.image_dir,
        "batch_size": d.batch_size,
        "num_workers": d.num_workers,
        "image_size": d.image_size,
        "feature_dim": m.feature_dim,
        "pose_dim": m.pose_dim,
        "num_control_layers": m.num_control_layers,
        "freeze_generator": m.freeze_generator,
        "epochs": o.epochs,
        "lr": o.lr,
        "weight_decay": o.weight_decay,
        "pose_loss_weight": o.pose_loss_weight,
        "loss_type": o.loss_type,
        "use_amp": o.use_amp,
        "gradient_accumulation_steps": o.gradient_accumulation_steps,
        "resume": out.resume,
        "save_dir": out.save_dir,
        "log_dir": out.log_dir,
        "save_interval": out.save_interval,
    }


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DDP / DataParallel / torch.compile: the one unwrap the package uses,
    so saved keys carry no prefixes, optimisers see the module's own parameters and a forward
    that must run no collective (evaluation, the frozen critic) bypasses DDP.  Here, not in the
    worker, because the engine (which never imports Ray) needs it too."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def trainable_names(model: nn.Module) -> list[str]:
    """Sorted names of parameters with ``requires_grad`` (what the optimiser holds)."""
    return sorted(n for n, p in unwrap_model(model).named_parameters() if p.requires_grad)


@dataclass
class CheckpointState:
    """Everything one ``.pth`` holds; ``to_dict`` gives the weights_only-safe dict saved."""

    epoch: int
    model_state_dict: dict[str, torch.Tensor]
    optimizer_state_dict: dict[str, Any]
    scheduler_state_dict: dict[str, Any]
    best_val_loss: float
    best_val_psnr: float
    best_metric: str
    train_metrics_history: list[dict[str, float]]
    val_metrics_history: list[dict[str, float]]
    args: dict[str, Any]
    config: dict[str, Any]
    model_signature: dict[str, Any]
    trainable: list[str]
    engine_state: dict[str, Any] = field(default_factory=dict)
    rng_state: dict[str, Any] = field(default_factory=dict)
    # one capture_rng_state() per rank, by rank: ranks are seeded seed + rank, and a resumed
    # rank continues its own streams (``rng_state`` stays rank 0's, for older readers)
    rank_rng_states: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: asdict() would deep-copy every tensor of the state dicts.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def build_checkpoint(
    *,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    model_signature: Mapping[str, Any],
    best_val_loss: float,
    best_val_psnr: float,
    train_history: Sequence[Mapping[str, float]],
    val_history: Sequence[Mapping[str, float]],
    engine_state: Mapping[str, Any] | None = None,
    rng_state: Mapping[str, Any] | None = None,
    rank_rng_states: Sequence[Mapping[str, Any]] = (),
    trainable: Sequence[str] | None = None,
    discriminator: nn.Module | None = None,
    discriminator_optimizer: torch.optim.Optimizer | None = None,
    pose_estimate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the dict saved as a ``.pth``; RNG and the trainable set are read now unless given.

    Pass ``trainable`` when ``model``'s ``requires_grad`` flags no longer say what the optimiser
    holds (e.g. names taken before wrapping).  ``discriminator`` (and its optimiser) add the
    ``DISC_KEY`` / ``DISC_OPTIMIZER_KEY`` entries; without them the file has neither.
    ``pose_estimate`` (plain lists and numbers) is stored under ``POSE_ESTIMATE_KEY``.

    Histories and scalars are converted to plain Python so the file stays weights_only-safe
    even when a caller hands in numpy or 0-d tensor values.
    """
    state = CheckpointState(
        epoch=int(epoch),
        model_state_dict=unwrap_model(model).state_dict(),
        optimizer_state_dict=optimizer.state_dict(),
        scheduler_state_dict=scheduler.state_dict() if scheduler is not None else {},
        best_val_loss=float(best_val_loss),
        best_val_psnr=float(best_val_psnr),
        best_metric=cfg.output.best_metric,
        train_metrics_history=[_plain_metrics(m) for m in train_history],
        val_metrics_history=[_plain_metrics(m) for m in val_history],
        args=legacy_args(cfg),
        config=cfg.to_dict(),
        model_signature=_to_plain(dict(model_signature)),
        trainable=sorted(trainable) if trainable is not None else trainable_names(model),
        engine_state=_to_plain(dict(engine_state or {})),
        rng_state=dict(rng_state) if rng_state is not None else capture_rng_state(),
        rank_rng_states=[dict(r) for r in rank_rng_states],
    )
    out = state.to_dict()
    if discriminator is not None:
        out[DISC_KEY] = unwrap_model(discriminator).state_dict()
        if discriminator_optimizer is not None:
            out[DISC_OPTIMIZER_KEY] = discriminator_optimizer.state_dict()
    if pose_estimate is not None:
        out[POSE_ESTIMATE_KEY] = _to_plain(dict(pose_estimate))
    bad = _nonfinite_weights(out)
    if bad:
        raise CheckpointError(
            f"refusing to save epoch {int(epoch)}: non-finite weights in {_listed(bad)} "
            "(the run diverged); nothing of this epoch was written. Lower --lr, check "
            "--pose_loss_weight/--identity_loss_weight/--adversarial_loss_weight, or try "
            "without --use_amp."
        )
    out[CONTENT_DIGEST_KEY] = content_digest(out)
    return out


def nonfinite_tensor_names(tensors: Mapping[str, Any]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf: the one finite check for weights,
    used before saving and after loading, so a broken model is never written or used."""
    return [
        str(name)
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and not bool(torch.isfinite(t).all())
    ]


def _nonfinite_weights(state: Mapping[str, Any]) -> list[str]:
    """Non-finite tensors of the model and, when present, the discriminator (prefixed)."""
    bad = []
    for key, prefix in (("model_state_dict", ""), (DISC_KEY, "discriminator.")):
        sd = state.get(key)
        if isinstance(sd, Mapping):
            bad += [prefix + name for name in nonfinite_tensor_names(sd)]
    return bad


def content_digest(state: Mapping[str, Any]) -> str:
    """sha256 over every value of ``state`` but the digest itself, in a canonical order.

    Tensors contribute dtype, shape and raw bytes; containers their keys and items; other
    values their type and repr (what ``torch.load(weights_only=True)`` gives back unchanged).
    """
    h = hashlib.sha256()
    _feed_digest(h, {k: v for k, v in state.items() if k != CONTENT_DIGEST_KEY})
    return h.hexdigest()


def _feed_digest(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(f"M{len(value)}".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed_digest(h, key)
            _feed_digest(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _feed_digest(h, item)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """Python numbers only; ints (e.g. ``epoch``) stay ints so JSON and prints read naturally."""
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        value = _to_plain(value)
        if isinstance(value, torch.Tensor):
            value = value.item()
        is_int = isinstance(value, int) and not isinstance(value, bool)
        out[str(key)] = value if is_int else float(value)
    return out


def _to_plain(value: Any) -> Any:
    """numpy / 0-d tensor scalars -> Python numbers, recursively; tensors otherwise kept."""
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, argparse.Namespace):
        return _to_plain(vars(value))
    return value
