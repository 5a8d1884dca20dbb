"""Checkpoint files in ``--save_dir``, shaped as the original script leaves them (named in
:mod:`controlnet_ray.run_files`).

Users of the original script load ``checkpoint_epoch_{N}.pth``, ``best_model.pth`` and
``final_model.pth`` with plain ``torch.load`` and read ``model_state_dict``, ``epoch``, ``args``
and friends, so those keys keep their names and meaning.  On top of them each file carries what an
*exact* resume needs (scaler, RNG streams, full config, model signature, trainable set).

Everything stored is safe for ``torch.load(weights_only=True)`` (tensors, numbers, strings,
containers) so files can be opened without trusting their source and by torch >= 2.6's default.
Writes are atomic: a crash mid-save leaves the previous file intact, never a truncated one.

Nothing here imports ray: the pure-PyTorch path uses this module too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from controlnet_ray import run_files
from controlnet_ray.config import TrainConfig

FORMAT_VERSION = 1
LEGACY_FORMAT_VERSION = 0  # files without ``format_version``: written by the original script
# Epochs are 1-based: the loop is ``for epoch in range(start_epoch, epochs + 1)`` and ``epoch``
# in a file is the last completed one, so a continuation starts at ``epoch + 1``.
FRESH_START_EPOCH = 1

# Keys the original script's readers rely on; ``model_state_dict`` alone marks a file as ours.
LEGACY_KEYS = (
    "epoch",
    "model_state_dict",
    "optimizer_state_dict",
    "scheduler_state_dict",
    "best_val_loss",
    "best_val_psnr",
    "train_metrics_history",
    "val_metrics_history",
    "args",
)
# sha256 of everything else in the file (see content_digest), verified by load_checkpoint:
# flipped bytes inside a tensor record load without complaint from torch's zip reader.
CONTENT_DIGEST_KEY = "content_sha256"
# The adversarial option's discriminator (--adversarial_loss_weight > 0): optional keys, absent
# from files of runs without it; the generator's keys never hold it (inference loads those alone).
DISC_KEY = "discriminator_state_dict"
DISC_OPTIMIZER_KEY = "discriminator_optimizer_state_dict"
_MAX_LISTED = 5  # mismatches named per category in error messages
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit this run; the message names the file."""


# --------------------------------------------------------------------------- contents


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
) -> dict[str, Any]:
    """Assemble the dict saved as a ``.pth``; RNG and the trainable set are read now unless given.

    Pass ``trainable`` when ``model``'s ``requires_grad`` flags no longer say what the optimiser
    holds (e.g. names taken before wrapping).  ``discriminator`` (and its optimiser) add the
    ``DISC_KEY`` / ``DISC_OPTIMIZER_KEY`` entries; without them the file has neither.

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


# --------------------------------------------------------------------------- loading


def _legacy_safe_globals() -> list[Any]:
    """Benign types the original script may have pickled (argparse args, numpy scalars)."""
    scalar_reconstruct = np.float64(0).__reduce__()[0]
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    return [argparse.Namespace, scalar_reconstruct, np.dtype, *dtypes]


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True`` and check it is one of ours.

    Files from the original script (no ``format_version``) are accepted and normalised: an
    ``argparse.Namespace`` under ``args`` becomes a dict, numpy scalars become floats, and
    ``format_version`` is set to 0.  The returned dict also records ``_loaded_from`` so later
    errors can name the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        with torch.serialization.safe_globals(_legacy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise CheckpointError(_load_failure_message(path, exc)) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: not a controlnet checkpoint (holds a {type(obj).__name__}, expected a dict "
            f"with {', '.join(LEGACY_KEYS)})"
        )
    missing = [k for k in LEGACY_KEYS if k not in obj]
    if "model_state_dict" in missing:
        raise CheckpointError(
            f"{path}: not a controlnet checkpoint; missing keys: {', '.join(missing)} "
            f"(has: {', '.join(sorted(map(str, obj))[:10]) or 'nothing'})"
        )
    version = obj.get("format_version", LEGACY_FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version!r} is newer than this controlnet-ray "
            f"supports ({FORMAT_VERSION}); upgrade controlnet-ray to read it"
        )
    _verify_integrity(obj, path)
    return _normalise(obj, path, version)


def _verify_integrity(obj: Mapping[str, Any], path: Path) -> None:
    """The recorded content hash must match (files written before it existed have none), and
    the weights must be finite whatever wrote them."""
    recorded = obj.get(CONTENT_DIGEST_KEY)
    if recorded is not None and recorded != content_digest(obj):
        raise CheckpointError(
            f"{path}: content hash mismatch: the file was changed or damaged after it was "
            "written (disk or copy error?); use another checkpoint (e.g. checkpoint_epoch_N.pth)"
        )
    bad = _nonfinite_weights(obj)
    if bad:
        raise CheckpointError(
            f"{path}: non-finite weights (NaN/inf) in {_listed(bad)}: the run that wrote it "
            "had diverged; use an earlier checkpoint"
        )


def _load_failure_message(path: Path, exc: Exception) -> str:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "Weights only load failed" in str(exc):
        return (
            f"{path}: holds Python objects that weights_only loading refuses (not written by "
            f"controlnet-ray, or from an untrusted source): {_unsafe_globals(path)}"
        )
    return (
        f"{path}: not a readable PyTorch checkpoint (corrupt or truncated? an interrupted copy?): "
        f"{type(exc).__name__}: {first_line}"
    )


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # diagnostics only
        return "unknown types"
    return ", ".join(n for n in names if n not in _legacy_global_names()) or "unknown types"


def _legacy_global_names() -> set[str]:
    return {f"{g.__module__}.{g.__qualname__}" for g in _legacy_safe_globals()}


def _normalise(obj: dict[str, Any], path: Path, version: int) -> dict[str, Any]:
    state = dict(obj)
    state["format_version"] = version
    state["model_state_dict"] = _strip_wrapper_prefixes(state["model_state_dict"])
    if isinstance(state.get(DISC_KEY), Mapping):
        state[DISC_KEY] = _strip_wrapper_prefixes(state[DISC_KEY])
    if isinstance(state.get("args"), argparse.Namespace):
        state["args"] = vars(state["args"])
    for key in ("best_val_loss", "best_val_psnr", "epoch"):
        if isinstance(state.get(key), np.generic):
            state[key] = state[key].item()
    for key in ("train_metrics_history", "val_metrics_history"):
        if key in state:
            state[key] = [_to_plain(m) for m in state[key]]
    state["_loaded_from"] = str(path)
    return state


def _strip_wrapper_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` / ``_orig_mod.`` prefix shared by every key (files saved wrapped)."""
    sd = dict(sd)
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _source(state: Mapping[str, Any]) -> str:
    return state.get("_loaded_from", "checkpoint")


# --------------------------------------------------------------------------- compatibility


def check_model_compat(
    state: Mapping[str, Any], model: nn.Module, model_signature: Mapping[str, Any]
) -> None:
    """Raise CheckpointError listing why the checkpoint's weights cannot load into ``model``.

    Signature differences come first because they explain the shape errors that follow
    (e.g. a different encoder).  Files without a signature (original script) are judged by
    parameter names and shapes alone.
    """
    problems = _signature_diffs(state.get("model_signature") or {}, model_signature)
    problems += _state_dict_diffs(state["model_state_dict"], unwrap_model(model).state_dict())
    if problems:
        lines = "\n  ".join(problems)
        raise CheckpointError(
            f"{_source(state)} does not fit the model this run builds:\n  {lines}"
        )


def _signature_diffs(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    if not saved:
        return []
    diffs = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            diffs.append(f"{key}: checkpoint has {old!r}, this run builds {new!r}")
    return diffs


def _state_dict_diffs(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    # Model order, not alphabetical: the first mismatches listed are the earliest layers.
    shapes = [
        f"{name}: {_shape(saved[name])} vs {_shape(value)}"
        for name, value in current.items()
        if name in saved and _shape(saved[name]) != _shape(value)
    ]
    missing = [name for name in current if name not in saved]
    unexpected = [name for name in saved if name not in current]
    out = []
    if shapes:
        out.append("shape mismatch (checkpoint vs model): " + _listed(shapes))
    if missing:
        out.append("missing in checkpoint: " + _listed(missing))
    if unexpected:
        out.append("unexpected in checkpoint: " + _listed(unexpected))
    return out


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _listed(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f"; ... and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- resume planning


@dataclass(frozen=True)
class ResumePlan:
    """What ``--resume`` does.

    ``restore_optimizer=True``: continue the same run: weights, optimiser, scheduler, scaler
    (``engine_state``), RNG, best metrics and histories come from the file; ``start_epoch`` is
    the saved epoch + 1.

    ``restore_optimizer=False`` (the original's stage-2 recipe, e.g. unfreezing the generator
    with a lower ``--lr``): only the weights are loaded; a fresh optimiser and LR schedule are
    built for the new trainable set, ``start_epoch`` is 1, histories start empty and best
    metrics reset, so this stage's ``best_model.pth`` is chosen among its own epochs.
    """

    restore_optimizer: bool
    reason: str
    start_epoch: int


def plan_resume(
    state: Mapping[str, Any], cfg: TrainConfig, trainable_names: Sequence[str]
) -> ResumePlan:
    """Decide between an exact continuation and a weights-only warm start (see ResumePlan)."""
    source = _source(state)
    changes = _trainable_change(state, trainable_names) + _hparam_changes(state, cfg)
    if "optimizer_state_dict" not in state:
        changes.append("checkpoint holds no optimizer state")
    if changes:
        reason = (
            f"{'; '.join(changes)}: fresh optimizer and schedule, weights loaded from {source}, "
            f"epoch counter restarts at {FRESH_START_EPOCH}, history and best metrics start empty"
        )
        return ResumePlan(False, reason, FRESH_START_EPOCH)
    epoch = int(state.get("epoch", -1))
    reason = (
        f"resumed model, optimizer, scheduler, scaler and history from {source} at epoch {epoch}"
    )
    if epoch >= cfg.optim.epochs:
        reason += f" (already at --epochs {cfg.optim.epochs}: nothing left to train)"
    return ResumePlan(True, reason, epoch + 1)


def _trainable_change(state: Mapping[str, Any], current: Sequence[str]) -> list[str]:
    saved = state.get("trainable")
    if saved is None:  # original script's file: compare how many tensors the optimiser held
        n_saved = _optimizer_param_count(state.get("optimizer_state_dict"))
        if n_saved is None or n_saved == len(current):
            return []
        return [f"trainable set changed ({n_saved} -> {len(current)} tensors)"]
    added, removed = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if not added and not removed:
        return []
    parts = []
    if added:
        parts.append(f"{_modules(added)} unfrozen: +{len(added)} tensors")
    if removed:
        parts.append(f"{_modules(removed)} frozen: -{len(removed)} tensors")
    return [f"trainable set changed ({', '.join(parts)})"]


def _modules(names: Sequence[str]) -> str:
    return "/".join(sorted({n.split(".", 1)[0] for n in names}))


def _optimizer_param_count(opt_state: Any) -> int | None:
    try:
        return sum(len(g["params"]) for g in opt_state["param_groups"])
    except (TypeError, KeyError):
        return None


def _hparam_changes(state: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """lr / weight_decay differences: a restored optimiser would silently keep the old values."""
    saved_optim = (state.get("config") or {}).get("optim") or state.get("args") or {}
    changes = []
    for key, new in (("lr", cfg.optim.lr), ("weight_decay", cfg.optim.weight_decay)):
        old = saved_optim.get(key)
        if old is not None and not _close(float(old), float(new)):
            changes.append(f"{key} {float(old):g} -> {new:g}")
    return changes


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 + 1e-9 * max(abs(a), abs(b))


# Settings a re-run of the same Ray run may change: they do not change what is computed
# (console, file cadence, data-loading parallelism, placement, retry budget). --epochs is
# handled apart (the run is extended or shortened); every other difference stops the re-run.
RERUN_FREE_FIELDS = frozenset(
    {
        ("data", "num_workers"),
        ("data", "cache_dir"),
        ("output", "log_dir"),
        ("output", "save_interval"),
        ("output", "image_log_interval"),
        ("output", "progress"),
        ("ray", "address"),
        ("ray", "max_failures"),
        ("ray", "num_to_keep"),
        ("ray", "fresh"),
        ("ray", "cpus_per_worker"),
        ("ray", "resource_wait_s"),
    }
)


@dataclass(frozen=True)
class RerunPlan:
    """How a re-run's flags compare with the config stored in its run's latest checkpoint.

    ``conflicts``: differences that would be silently ignored or mixed with the old run's
    state (``--lr 0.0001 -> 0.005``): the re-run must stop. ``notes``: differences it
    continues with, said aloud (``--epochs 3 -> 4``).
    """

    epoch: int
    conflicts: list[str]
    notes: list[str]


def plan_rerun(state: Mapping[str, Any], cfg: TrainConfig) -> RerunPlan:
    """Compare ``cfg`` with the config a Ray checkpoint of the same run was written with."""
    epoch = int(state.get("epoch", 0))
    if not state.get("config"):
        return RerunPlan(epoch, [], [])
    try:
        saved = TrainConfig.from_dict(state["config"]).to_dict()
    except (TypeError, ValueError) as exc:
        return RerunPlan(epoch, [f"its stored config is not readable here ({exc})"], [])
    current = cfg.to_dict()
    conflicts, notes = [], []
    for section, fields in current.items():
        for name, new in fields.items():
            old = saved[section][name]
            if _same_setting(old, new) or (section, name) in RERUN_FREE_FIELDS:
                continue
            change = f"--{name} {_setting(old)} -> {_setting(new)}"
            if (section, name) != ("optim", "epochs"):
                conflicts.append(change)
            elif new < epoch:
                conflicts.append(f"{change} (the run already completed epoch {epoch})")
            else:
                notes.append(f"{change}: continuing to epoch {new}, LR schedule re-planned")
    return RerunPlan(epoch, conflicts, notes)


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and _close(a, b)
    return a == b


def _setting(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_setting(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class RunState:
    """What carries across epochs and into checkpoints: the epoch the loop starts at and the
    best metrics and histories it extends.

    Defined here rather than in the worker so that the one resume path (:func:`restore_weights`
    then :func:`restore_training_state`) is Ray-free and the exact-continuation test runs the
    code production runs.
    """

    start_epoch: int = FRESH_START_EPOCH
    best_val_loss: float = float("inf")
    best_val_psnr: float = float("-inf")
    train_history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)

    def record_epoch(
        self, epoch: int, train: Mapping[str, float], val: Mapping[str, float], best_metric: str
    ) -> bool:
        """Append the epoch to the histories and update the bests; returns whether the epoch is
        the best so far by ``best_metric`` (:func:`run_files.improves`): its state becomes
        ``best_model.pth``. Both bests are kept whatever the metric (the files store both)."""
        self.train_history.append({"epoch": epoch, **train})
        self.val_history.append({"epoch": epoch, **val})
        best = {"loss": self.best_val_loss, "psnr": self.best_val_psnr}
        is_best = run_files.improves(best_metric, val, best)
        self.best_val_loss = min(self.best_val_loss, val["loss"])
        self.best_val_psnr = max(self.best_val_psnr, val["psnr"])
        return is_best

    @classmethod
    def continued_from(cls, state: Mapping[str, Any], start_epoch: int) -> RunState:
        """The run ``state`` was saved from, continuing at ``start_epoch`` (history adopted)."""
        return cls(
            start_epoch=start_epoch,
            best_val_loss=float(state.get("best_val_loss", float("inf"))),
            best_val_psnr=float(state.get("best_val_psnr", float("-inf"))),
            train_history=list(state.get("train_metrics_history", [])),
            val_history=list(state.get("val_metrics_history", [])),
        )


@dataclass(frozen=True)
class StartingPoint:
    """What :func:`restore_weights` decided about a starting checkpoint.

    ``continuing``: the run goes on where the file stopped, so the caller must follow with
    :func:`restore_training_state` (and pass its discriminator optimizer to
    :func:`restore_discriminator`); False is a warm start (weights only, fresh optimizer,
    schedule, history). ``message`` is the line that tells the user which it was and why.
    """

    run: RunState
    continuing: bool
    message: str


def restore_weights(
    state: Mapping[str, Any],
    model: nn.Module,
    signature: Mapping[str, Any],
    cfg: TrainConfig,
    trainable: Sequence[str],
    ray_checkpoint: str | None = None,
) -> StartingPoint:
    """First half of the one resume path: check ``state`` fits ``model``, load its weights, and
    decide whether the run continues or warm-starts.

    Split from :func:`restore_training_state` because the worker must load weights before DDP
    wraps the model, and builds the optimizer, scheduler and engine only after.
    ``ray_checkpoint`` is the folder of this run's own Ray checkpoint (a driver restart or worker
    failure: always continues, flags were already checked by ``plan_rerun``); None for
    ``--resume``, which continues or warm-starts as :func:`plan_resume` decides.
    """
    check_model_compat(state, model, signature)
    unwrap_model(model).load_state_dict(state["model_state_dict"])
    if ray_checkpoint:
        run = RunState.continued_from(state, int(state["epoch"]) + 1)
        message = (
            f"resumed from Ray checkpoint {ray_checkpoint} at epoch {state['epoch']}"
            f" (continuing at epoch {run.start_epoch})"
        )
        return StartingPoint(run, True, message)
    plan = plan_resume(state, cfg, trainable)
    message = f"--resume {cfg.output.resume}: {plan.reason}"
    if plan.restore_optimizer:
        return StartingPoint(RunState.continued_from(state, plan.start_epoch), True, message)
    return StartingPoint(RunState(start_epoch=plan.start_epoch), False, message)


class _Loadable(Protocol):
    """Anything with ``load_state_dict`` (the engine: checkpoint.py cannot import it, the
    engine imports this module)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


def restore_training_state(
    state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    engine: _Loadable | None,
    *,
    rank: int,
    seed: int,
    start_epoch: int,
) -> None:
    """Second half of the one resume path, for a continuing run (``StartingPoint.continuing``):
    optimizer, scheduler, the engine's state (scaler, counters) and this rank's RNG streams.

    Each rank continues its own streams (:func:`rng_state_for_rank`); a rank the file saved
    none for (it was written by fewer workers, or by the original script) gets a stream derived
    from (seed, rank, start_epoch) rather than a repeat of the one it started the run with.
    """
    optimizer.load_state_dict(state["optimizer_state_dict"])
    scheduler.load_state_dict(state["scheduler_state_dict"])
    if engine is not None and state.get("engine_state"):
        engine.load_state_dict(state["engine_state"])
    mine = rng_state_for_rank(state, rank)
    if mine:
        restore_rng_state(mine)
    else:
        seed_rank_streams(seed, rank, start_epoch)


def restore_discriminator(
    state: Mapping[str, Any],
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> str:
    """Load the discriminator's weights (and ``optimizer``'s state when given and saved) from
    ``state``; returns the line saying what happened.

    Mirrors the generator: weights whenever the file has them, the optimiser only when the
    caller continues the run (passes ``optimizer``).  A file without a discriminator (an older
    checkpoint, or a run without the option) leaves the fresh one: the option can be switched
    on for a new stage.  A discriminator that does not fit raises CheckpointError naming it.
    """
    source = _source(state)
    saved = state.get(DISC_KEY)
    if not saved:
        return f"{source} holds no discriminator: a fresh one starts"
    current = unwrap_model(discriminator).state_dict()
    problems = _state_dict_diffs(saved, current)
    if problems:
        raise CheckpointError(
            f"{source}: its discriminator does not fit this run's: " + "; ".join(problems)
        )
    unwrap_model(discriminator).load_state_dict(saved)
    if optimizer is None:
        return f"discriminator weights loaded from {source}, fresh discriminator optimizer"
    if not state.get(DISC_OPTIMIZER_KEY):
        return f"discriminator weights loaded from {source} (it holds no discriminator optimizer)"
    optimizer.load_state_dict(state[DISC_OPTIMIZER_KEY])
    return f"discriminator and its optimizer resumed from {source}"


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy-global / ``random`` streams, weights_only-safe.

    numpy's MT19937 key becomes an int64 tensor and ``random``'s state a tuple of ints because
    numpy arrays are not loadable with ``weights_only=True``.  Generators created with
    ``np.random.default_rng`` are not global state and are not captured.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": (int(version), tuple(int(x) for x in internal), gauss_next),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA streams restored for the devices both have."""
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        for device, rng in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, device)
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))


def rng_state_for_rank(state: Mapping[str, Any], rank: int) -> Mapping[str, Any] | None:
    """The RNG streams ``rank`` saved (``rank_rng_states``), so each rank of a resumed run
    continues its own stream instead of all taking rank 0's. Files without per-rank states
    (older ones, the original script's) give rank 0 ``rng_state`` and other ranks None."""
    per_rank = state.get("rank_rng_states") or []
    if rank < len(per_rank):
        return per_rank[rank]
    return state.get("rng_state") if rank == 0 else None


def seed_rank_streams(seed: int, rank: int, epoch: int) -> None:
    """Seed torch / numpy / ``random`` for a rank the checkpoint saved no streams for (a
    resume with more workers): a stream of its own, derived from (seed, rank, epoch), rather
    than a repeat of the one it started the run with."""
    derived = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)
