"""``python -m controlnet_ray.train``: the original script's command line on Ray Train.

Thin on purpose: parse and validate (fast, before any heavy import), run, print where the
outputs went. Also the entrypoint of ``ray job submit``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from controlnet_ray.cli import parse_train_args


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_train_args(argv)
    from controlnet_ray.launcher import EXPECTED_ERRORS, run_training

    try:
        run_training(cfg)
    except EXPECTED_ERRORS as exc:  # bad input found by our own checks: one line, rc 2
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # Ray wraps worker errors; show them without a driver traceback
        if type(exc).__module__.startswith("ray."):
            print(f"training failed: {worker_error_line(str(exc))}", file=sys.stderr)
            return 1
        raise
    from controlnet_ray import run_files
    from controlnet_ray.storage import LOG_DIR, SAVE_DIR, join_uri

    save_dir = Path(cfg.output.save_dir).resolve()
    print("outputs:")
    pth = (run_files.BEST_MODEL, run_files.FINAL_MODEL, run_files.epoch_checkpoint("N"))
    print(f"  checkpoints       {save_dir} ({', '.join(pth)})")
    print(
        f"  TensorBoard logs  {Path(cfg.output.log_dir).resolve()}  "
        f"(tensorboard --logdir {cfg.output.log_dir})"
    )
    print(
        f"  curves, history   {save_dir / run_files.FINAL_CURVES}, {save_dir / run_files.HISTORY}"
    )
    run_dir = join_uri(cfg.storage_path(), cfg.run_name())
    print(f"  Ray checkpoints   {run_dir}")
    print(
        f"  run storage       {join_uri(cfg.storage_path(), cfg.run_name(), SAVE_DIR)}, "
        f"{LOG_DIR} beside it (all of the above, kept there)"
    )
    return 0


def one_line(message: str) -> str:
    """A multi-line message (e.g. a list of mismatches) joined into one line."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def worker_error_line(message: str) -> str:
    """The worker's own error line out of Ray's wrapped message (its traceback included)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return errors[-1] if errors else one_line(message)


if __name__ == "__main__":
    sys.exit(main())
