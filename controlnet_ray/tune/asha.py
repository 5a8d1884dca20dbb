"""ASHA whose rungs survive ``Tuner.restore``: the scheduler, and the rung mirror file it
writes after every result and reads back when it is unpickled."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from controlnet_ray.config import TrainConfig
from controlnet_ray.files import atomic_write_text
from controlnet_ray.tune.search_space import TIME_ATTR, SweepOptions


def asha_state_file(cfg: TrainConfig, opts: SweepOptions) -> Path:
    """Where ASHA's rungs are mirrored: beside the sweep's results, always a local path."""
    return Path(cfg.output.save_dir) / opts.sweep_name / "asha_rungs.json"


def make_scheduler(opts: SweepOptions, max_t: int, state_file: Path) -> Any:
    """ASHA on the reported epoch, or None for ``--scheduler none``. Its metric and mode are
    the Tuner's (:func:`controlnet_ray.tune.search_space.sweep_metric`); its grace period is
    :meth:`SweepOptions.grace_epochs` of ``max_t`` (``--epochs``).

    Tune 2.60 saves the searcher's state with the experiment but not the scheduler's, so a
    plain ASHA restored by ``Tuner.restore`` starts with empty rungs and lets every later
    trial through. This subclass mirrors its rung records to ``state_file`` after each result
    and reads them back when ``Tuner.restore`` unpickles it. The class is built here, not at
    module level, so that importing this module does not import Ray (cloudpickle stores it
    by value in the Tuner's state).
    """
    if opts.scheduler != "asha":
        return None
    from ray.tune.schedulers import AsyncHyperBandScheduler

    class ResumableASHA(AsyncHyperBandScheduler):
        def __init__(self, rungs_file: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.rungs_file = rungs_file

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            save_rungs(getattr(self, "_brackets", None), self.rungs_file)
            return action

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            super().on_trial_complete(tune_controller, trial, result)
            save_rungs(getattr(self, "_brackets", None), self.rungs_file)

        def __setstate__(self, state: dict) -> None:
            self.__dict__.update(state)
            load_rungs(getattr(self, "_brackets", None), self.rungs_file)

    scheduler = ResumableASHA(
        str(state_file),
        time_attr=TIME_ATTR,
        max_t=max_t,
        grace_period=opts.grace_epochs(max_t),
        reduction_factor=opts.reduction_factor,
    )
    if rung_lists(getattr(scheduler, "_brackets", None)) is None:
        print(
            "warning: this Ray's ASHA keeps its rungs in an unknown layout; the sweep runs, "
            "but a resumed sweep starts ASHA with empty rungs",
            file=sys.stderr,
            flush=True,
        )
    return scheduler


def rung_lists(brackets: Any) -> list[list] | None:
    """ASHA's rung records, one list of ``(milestone, {trial_id: reward})`` per bracket, or
    None when this Ray's ASHA does not keep them that way.

    ``_brackets``/``_rungs`` are ASHA's private bookkeeping in the pinned Ray 2.60; a Ray with
    another layout must not break the sweep, only the rung mirror (see :func:`make_scheduler`).
    """
    try:
        rungs = [b._rungs for b in brackets]
    except (AttributeError, TypeError):
        return None
    for bracket in rungs:
        if not isinstance(bracket, list) or not all(
            isinstance(r, tuple | list) and len(r) == 2 and isinstance(r[1], dict) for r in bracket
        ):
            return None
    return rungs


def save_rungs(brackets: Any, path: str) -> bool:
    """Write each bracket's rungs as ``[[milestone, {trial_id: reward}], ...]`` atomically;
    False (nothing written) when :func:`rung_lists` does not know this Ray's layout."""
    rungs = rung_lists(brackets)
    if rungs is None:
        return False
    data = [[[m, dict(rec)] for m, rec in bracket] for bracket in rungs]
    atomic_write_text(path, json.dumps(data))
    return True


def load_rungs(brackets: Any, path: str) -> int:
    """Refill the rungs from :func:`save_rungs`' file; returns how many records came back.
    Milestones are checked before a file is trusted."""
    target = Path(path)
    rungs = rung_lists(brackets)
    if rungs is None or not target.is_file():
        return 0
    data = json.loads(target.read_text())
    restored = 0
    for bracket, saved in zip(rungs, data, strict=False):
        for (milestone, recorded), (saved_m, saved_rec) in zip(bracket, saved, strict=False):
            if float(milestone) == float(saved_m):
                recorded.update(saved_rec)
                restored += len(saved_rec)
    if restored:
        print(f"ASHA: restored {restored} rung record(s) from {target}", flush=True)
    return restored
