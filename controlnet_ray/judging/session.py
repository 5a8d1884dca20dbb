"""Everything judging needs for one shard directory, set up once: judge, pairs, baselines.

``prepare_judging`` is what ``evaluate``, the benchmarks and a training loop call; afterwards
``judging.report(model_fn)`` scores a model against the cached trivial rows (the baselines are
run once, the model as often as it changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlnet_ray.config import DataConfig
from controlnet_ray.judging.data import MAX_TRAIN_ROWS, Rows, build_eval_set, load_rows
from controlnet_ray.judging.identity_judge import (
    IdentityJudge,
    default_identity_settings,
    ensure_identity_judge,
)
from controlnet_ray.judging.pose_judge import (
    JudgeSettings,
    PoseJudge,
    ensure_pose_judge,
    judge_cache_path,
)
from controlnet_ray.judging.predictors import TrivialPredictors, fit_trivial_predictors
from controlnet_ray.judging.report import Embedder, Predictor, Scorer, build_report
from controlnet_ray.metrics import face_mask


def even_subset(items: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` items spread evenly over ``items`` (deterministic, covers every person)."""
    if limit <= 0 or len(items) <= limit:
        return items
    return items[np.linspace(0, len(items) - 1, limit).round().astype(int)]


@dataclass
class Judging:
    """A ready scorer on the held-out pairs, the fitted trivial predictors and their rows."""

    scorer: Scorer
    trivial: TrivialPredictors
    held: Rows
    pairs: np.ndarray  # [P, 2] indices into ``held``
    trivial_rows: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def score_trivial(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-image metrics of every trivial predictor (computed on the first call)."""
        if not self.trivial_rows:
            self.trivial_rows = {k: self.scorer.run(f) for k, f in self.trivial.as_dict().items()}
        return self.trivial_rows

    def report(
        self, model_fn: Predictor | None = None, device: torch.device | None = None
    ) -> dict[str, Any]:
        """The judged report of the trivial predictors, plus ``model`` when ``model_fn`` given."""
        rows = dict(self.score_trivial())
        if model_fn is not None:
            rows["model"] = self.scorer.run(model_fn, device)
        return build_report(self.scorer, rows, "model")


def ensure_judges(shards_dir: str | Path, cache_root: str | Path, progress: str = "auto") -> None:
    """Train (or find) both judges of this shard directory: a training run does it once before
    training starts (on the driver, or as a Ray task on a cluster), so its workers only load
    them. ``progress``: how training shows its steps, as ``--progress`` (``auto``: a bar on
    a terminal, a line every half minute elsewhere)."""
    ensure_pose_judge(shards_dir, cache_root, progress=progress)
    ensure_identity_judge(shards_dir, cache_root, progress=progress)


def judges_cached(shards_dir: str | Path, cache_root: str | Path) -> bool:
    """Whether both judges :func:`ensure_judges` makes are already in ``cache_root`` (cheap:
    the shards' manifest and two file lookups, nothing loaded)."""
    return all(p.is_file() for p in judge_files(shards_dir, cache_root))


def judge_files(shards_dir: str | Path, cache_root: str | Path) -> tuple[Path, Path]:
    """Where :func:`ensure_judges` keeps this shard directory's pose and identity judges."""
    pose = judge_cache_path(shards_dir, cache_root, JudgeSettings())
    settings = default_identity_settings(shards_dir)
    return pose, judge_cache_path(shards_dir, cache_root, settings, kind="identity")


def prepare_judging(
    shards_dir: str | Path,
    cache_root: str | Path,
    held_splits: Sequence[str] = ("val", "test"),
    pair_mode: str = DataConfig.pair_mode,
    min_deg: float = DataConfig.min_pose_distance,
    max_deg: float = DataConfig.max_pose_distance,
    max_pairs: int = 0,
    mask: torch.Tensor | None = None,
    embed: Embedder | None = None,
    settings: JudgeSettings | None = None,
    judge: PoseJudge | None = None,
    verbose: bool = True,
    identity: IdentityJudge | None = None,
) -> Judging:
    """Judges (cached), held-out pairs of ``held_splits`` (``data.pairs.make_pairs``, an even
    subset of ``max_pairs`` when > 0) and trivial predictors fitted on the train split's frames
    of the targets' role."""
    from controlnet_ray.data.pairs import make_pairs

    held = load_rows(shards_dir, held_splits)
    pairs = even_subset(make_pairs(held.columns(), pair_mode, min_deg, max_deg), max_pairs)
    if len(pairs) == 0:
        raise ValueError(f"{shards_dir}: no {pair_mode} pairs in splits {list(held_splits)}")
    judge = judge or ensure_pose_judge(shards_dir, cache_root, settings, verbose)
    identity = identity or ensure_identity_judge(shards_dir, cache_root, verbose=verbose)
    if mask is None:
        from controlnet_ray.data.shards import load_manifest

        framing = load_manifest(shards_dir).framing
        mask = face_mask(int(held.images.shape[1]), framing)
    scorer = Scorer(build_eval_set(held, pairs), judge, mask, embed, identity=identity)
    trivial = fit_trivial(shards_dir, np.unique(held.role[pairs[:, 1]]), scorer.mask)
    return Judging(scorer, trivial, held, pairs)


def fit_trivial(
    shards_dir: str | Path, roles: Sequence[str], mask: torch.Tensor
) -> TrivialPredictors:
    """The trivial predictors, fitted on the train split's frames of the targets' ``roles``
    (an even subset of at most ``MAX_TRAIN_ROWS``)."""
    train = load_rows(shards_dir, ("train",), max_rows=MAX_TRAIN_ROWS)
    train = train.subset(np.isin(train.role, roles))
    return fit_trivial_predictors(train.images, train.poses, mask)
