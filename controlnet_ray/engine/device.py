"""Where the engine runs: the ``--device`` rule shared by every CLI and benchmark."""

from __future__ import annotations

import torch

from controlnet_ray.config import DEVICE_CHOICES


class DeviceError(ValueError):
    """A ``--device`` value this machine cannot honour; callers re-raise it in their own kind."""


def resolve_device(name: str) -> torch.device:
    """cpu | cuda | auto -> torch.device, the one rule for every CLI and benchmark script.

    ``cuda`` without a visible GPU is an error, not a fallback: a run that asked for a GPU and
    silently used the CPU would report misleading speeds.  Here (torch only, no Ray) so the
    Ray-free benchmark scripts and the inference CLIs share it.
    """
    if name not in DEVICE_CHOICES:
        raise DeviceError(f"--device must be cpu, cuda or auto, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device visible to torch here")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
