"""Independent judges of generated faces, never used as a training loss (issue #12).

Ray-free (never imports ray or ray.data); the engine and model packages do not import it. Typical
use, from a script or ``controlnet_ray.evaluate``::

    from controlnet_ray.judging import (
        build_eval_set, ensure_pose_judge, fit_trivial_predictors, load_rows, Scorer,
        evaluate_predictors, format_report,
    )
    rows = load_rows(shards_dir)
    train, held = rows.subset(rows.split == "train"), rows.subset(rows.split != "train")
    judge = ensure_pose_judge(shards_dir, cache_root)          # frozen, cached per dataset
    scorer = Scorer(build_eval_set(held, pairs), judge)        # pairs: make_pairs(held.columns())
    trivial = fit_trivial_predictors(train_video.images, train_video.poses, scorer.mask)
    report = evaluate_predictors({**trivial.as_dict(), "model": model.generate}, scorer)
    print(format_report(report))

A training loop keeps one ``Scorer`` and the trivial rows (``scorer.run(fn)`` once each) and per
epoch calls ``build_report(scorer, {**trivial_rows, "model": scorer.run(model.generate)})`` and
``summary_line(report)``.
"""

from controlnet_ray.judging.data import EvalSet, Rows, build_eval_set, load_rows
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

__all__ = [
    "TRIVIAL",
    "EvalSet",
    "JudgeSettings",
    "PoseJudge",
    "Rows",
    "Scorer",
    "TrivialPredictors",
    "build_eval_set",
    "build_report",
    "ensure_pose_judge",
    "evaluate_predictors",
    "fit_trivial_predictors",
    "format_report",
    "judge_cache_path",
    "load_rows",
    "summary_line",
    "train_pose_judge",
]
