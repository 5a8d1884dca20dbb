"""The frame of generate, evaluate and export: parse, validate, run, and fail alike."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from controlnet_ray.inference.errors import InferenceError

if TYPE_CHECKING:
    import argparse

_Checked = TypeVar("_Checked")


def run_cli(
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
    validate: Callable[[argparse.Namespace], _Checked],
    run: Callable[[argparse.Namespace, _Checked], int],
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse, validate, run: the frame of generate, evaluate and export, so they fail alike.

    A bad flag (InferenceError from ``validate``) and an expected failure while running
    (InferenceError, CheckpointError or one of ``errors``) print ``error: ...`` and give exit
    status 2; anything else is a bug and propagates.  ``validate`` runs before the checkpoint
    module (torch) is imported, so bad flags fail fast.
    """
    args = parser.parse_args(argv)
    try:
        checked = validate(args)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from controlnet_ray.checkpoint import CheckpointError  # imports torch: after validation

    try:
        return run(args, checked)
    except (InferenceError, CheckpointError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
