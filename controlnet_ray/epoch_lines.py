"""The Ray Train callback that posts each epoch's console line (see :mod:`controlnet_ray.progress`).

Its own module because it subclasses ``ray.train.UserCallback``: :mod:`controlnet_ray.progress`
stays importable without Ray, so the Ray-free training loop (:mod:`controlnet_ray.loop`) can
post through :class:`~controlnet_ray.progress.WorkerProgress`.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from controlnet_ray.progress import post_or_print


class EpochLines(UserCallback):
    """Train callback, run in the controller after it registered a report and its checkpoint.

    Posting the epoch line from here, not from rank 0, means a printed epoch is a saved epoch:
    a run killed right after the line resumes after that epoch.
    """

    def __init__(self, board: Any | None = None) -> None:
        self.board = board

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics and "val_psnr" in metrics[0]:
            post_or_print(self.board, "epoch", metrics[0], None)
