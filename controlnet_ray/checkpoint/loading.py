"""Reading a ``.pth``: ``weights_only`` loading, the integrity checks (content hash, finite
weights), and normalising the original script's files."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlnet_ray.checkpoint.contents import _nonfinite_weights, _to_plain, content_digest
from controlnet_ray.checkpoint.format import (
    CONTENT_DIGEST_KEY,
    DISC_KEY,
    FORMAT_VERSION,
    LEGACY_FORMAT_VERSION,
    LEGACY_KEYS,
    CheckpointError,
    _listed,
)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


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
