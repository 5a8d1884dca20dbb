"""Pieces the benchmark scripts share; pure PyTorch, so they also run where Ray is absent."""

from __future__ import annotations

import sys

import torch


def pick_device(name: str) -> torch.device:
    """The package's :func:`~controlnet_ray.engine.resolve_device`, its error as an exit.

    One rule for the CLIs and the scripts (``cuda`` without a GPU fails, never falls back);
    the scripts have no error handling of their own, so the message becomes the exit.
    Imported here, not at the top: the scripts import this module before they put the
    checkout on ``sys.path`` (``controlnet_ray.engine`` is Ray-free).
    """
    from controlnet_ray.engine import DeviceError, resolve_device

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
