"""Pieces the benchmark scripts share; pure PyTorch, so they also run where Ray is absent."""

from __future__ import annotations

import sys

import torch


def pick_device(name: str) -> torch.device:
    """cpu | cuda | auto -> torch.device; ``cuda`` without a GPU exits instead of falling back."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return torch.device(name)


def assert_no_ray(what: str) -> None:
    """Exit if anything imported Ray: the GPU checks drive these scripts without it."""
    loaded = sorted(
        m for m, mod in sys.modules.items() if (m == "ray" or m.startswith("ray.")) and mod
    )
    if loaded:
        raise SystemExit(f"FAIL: {what} loaded Ray ({loaded[:5]}); it must not")
