"""``python -m controlnet_ray.train``: the original script's command line on Ray Train.

Thin on purpose: parse and validate (fast, before any heavy import), run, print where the
outputs went. Also the entrypoint of ``ray job submit``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from controlnet_ray.cli import parse_train_args
from controlnet_ray.config import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_train_args(argv)
    from controlnet_ray.launcher import run_training

    try:
        result = run_training(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    error = getattr(result, "error", None)
    if error is not None:
        print(f"training failed: {error}", file=sys.stderr)
        return 1
    save_dir = Path(cfg.output.save_dir).resolve()
    print("outputs:")
    print(
        f"  checkpoints       {save_dir} (best_model.pth, final_model.pth, checkpoint_epoch_N.pth)"
    )
    print(
        f"  TensorBoard logs  {Path(cfg.output.log_dir).resolve()}  "
        f"(tensorboard --logdir {cfg.output.log_dir})"
    )
    print(
        f"  curves, history   {save_dir / 'final_training_curves.png'}, "
        f"{save_dir / 'training_history.json'}"
    )
    print(f"  Ray checkpoints   {cfg.storage_path()}/{cfg.run_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
