"""Pieces the benchmark scripts share; pure PyTorch, so they also run where Ray is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:  # run from a checkout: the scripts import this module first
    sys.path.insert(0, _REPO)

from controlnet_ray.engine import DeviceError, resolve_device  # noqa: E402  (Ray-free)


def pick_device(name: str) -> torch.device:
    """The package's :func:`~controlnet_ray.engine.resolve_device`, its error as an exit.

    One rule for the CLIs and the scripts (``cuda`` without a GPU fails, never falls back);
    the scripts have no error handling of their own, so the message is the exit status.
    """
    try:
        return resolve_device(name)
    except DeviceError as exc:
        raise SystemExit(str(exc)) from None


def assert_no_ray(what: str) -> None:
    """Exit if anything imported Ray: the GPU checks drive these scripts without it."""
    loaded = sorted(
        m for m, mod in sys.modules.items() if (m == "ray" or m.startswith("ray.")) and mod
    )
    if loaded:
        raise SystemExit(f"FAIL: {what} loaded Ray ({loaded[:5]}); it must not")
