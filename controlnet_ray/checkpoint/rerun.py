"""A re-run of the same Ray run: which flag changes it continues with and which stop it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlnet_ray.checkpoint.resume import _close
from controlnet_ray.config import RERUN_FREE_FIELDS, TrainConfig


@dataclass(frozen=True)
class RerunPlan:
    """How a re-run's flags compare with the config stored in its run's latest checkpoint.

    ``conflicts``: differences that would be silently ignored or mixed with the old run's
    state (``--lr 0.0001 -> 0.005``): the re-run must stop. ``notes``: differences it
    continues with, said aloud (``--epochs 3 -> 4``). The free fields are
    :data:`~controlnet_ray.config.RERUN_FREE_FIELDS`; ``--epochs`` may grow.
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
            change = f"--{name} {format_setting(old)} -> {format_setting(new)}"
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


def setting_changes(config: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """``--flag old -> new`` for each setting that defines a training
    (:meth:`TrainConfig.defining_settings`) and differs between a stored config and ``cfg``:
    why a run with ``cfg`` is another run than the one that stored ``config``."""
    try:
        old = TrainConfig.from_dict(dict(config)).defining_settings()
    except (TypeError, ValueError) as exc:
        return [f"its stored config is not readable here ({exc})"]
    return [
        f"--{name} {format_setting(old[section][name])} -> {format_setting(new)}"
        for section, fields in cfg.defining_settings().items()
        for name, new in fields.items()
        if not _same_setting(old[section][name], new)
    ]


def format_setting(value: Any) -> str:
    """A setting as a flag's value is typed: floats short (``0.0001``), lists space-separated."""
    if isinstance(value, (list, tuple)):
        return " ".join(format_setting(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
