"""Whether a file's weights fit the model this run builds (signature, names, shapes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from controlnet_ray.checkpoint.contents import unwrap_model
from controlnet_ray.checkpoint.format import CheckpointError, _listed
from controlnet_ray.checkpoint.loading import _source


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
    """Differences in the keys the file records: a key added to the signature after the file
    was written (``fill_seed``) is judged by the names and shapes alone, as files without a
    signature are."""
    if not saved:
        return []
    diffs = []
    for key in sorted(saved):
        old, new = saved[key], current.get(key, "<absent>")
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
