"""Independent judges of generated faces, never used as a training loss (issue #12).

Ray-free (never imports ray or ray.data); the engine and model packages do not import it.

From a script (``benchmarks/judge.py``, ``controlnet_ray.evaluate``)::

    from controlnet_ray.judging import format_report, prepare_judging
    judging = prepare_judging(shards_dir, cache_root)      # judge (cached), pairs, baselines
    report = judging.report(model.generate, device)        # rows floor/trivial/model, headline
    print(format_report(report))

From a training loop: build ``judging`` once (rank 0, before the first epoch; the judge is trained
once per dataset and then loaded from the cache), then per validation
``print(summary_line(judging.report(model.generate, device)))``; the trivial rows are scored on
the first call and reused.
"""

from controlnet_ray.judging.data import EvalSet, Rows, build_eval_set, load_rows
from controlnet_ray.judging.identity_judge import (
    IdentityJudge,
    IdentitySettings,
    ensure_identity_judge,
    train_identity_judge,
)
from controlnet_ray.judging.pose_judge import (
    JudgeSettings,
    PoseJudge,
    ensure_pose_judge,
    judge_cache_path,
    train_pose_judge,
)
from controlnet_ray.judging.predictors import TRIVIAL, TrivialPredictors, fit_trivial_predictors
from controlnet_ray.judging.report import (
    Scorer,
    build_report,
    evaluate_predictors,
    format_report,
    summary_line,
)
from controlnet_ray.judging.session import (
    Judging,
    ensure_judges,
    judge_files,
    judges_cached,
    prepare_judging,
)

__all__ = [
    "TRIVIAL",
    "EvalSet",
    "IdentityJudge",
    "IdentitySettings",
    "JudgeSettings",
    "Judging",
    "PoseJudge",
    "Rows",
    "Scorer",
    "TrivialPredictors",
    "build_eval_set",
    "build_report",
    "ensure_identity_judge",
    "ensure_judges",
    "ensure_pose_judge",
    "evaluate_predictors",
    "fit_trivial_predictors",
    "format_report",
    "judge_cache_path",
    "judge_files",
    "judges_cached",
    "load_rows",
    "prepare_judging",
    "summary_line",
    "train_identity_judge",
    "train_pose_judge",
]
