"""Mixed precision: which autocast dtype, and whether a GradScaler is needed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AmpSettings:
    """How the forward pass runs: autocast on/off, its dtype, and whether a GradScaler is used."""

    enabled: bool
    dtype: torch.dtype
    use_scaler: bool
    description: str


def resolve_amp(use_amp: bool, device: torch.device) -> AmpSettings:
    """Pick the best mixed precision for ``device`` when ``--use_amp`` is set.

    bfloat16 has float32's exponent range, so it needs no loss scaling; float16 (only on
    CUDA devices without bf16, i.e. pre-Ampere) needs a GradScaler against underflow.
    """
    device = torch.device(device)
    if not use_amp:
        return AmpSettings(False, torch.float32, False, f"AMP: off (float32 on {device.type})")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return AmpSettings(
                True, torch.bfloat16, False, "AMP: bfloat16 autocast on cuda (no GradScaler)"
            )
        return AmpSettings(
            True,
            torch.float16,
            True,
            "AMP: float16 autocast on cuda with GradScaler (this GPU lacks bfloat16)",
        )
    if device.type == "cpu":
        return AmpSettings(
            True, torch.bfloat16, False, "AMP: bfloat16 autocast on cpu (no GradScaler)"
        )
    return AmpSettings(
        False,
        torch.float32,
        False,
        f"AMP: requested but not supported on {device.type}; running float32",
    )


def _autocast(device: torch.device, amp: AmpSettings) -> contextlib.AbstractContextManager:
    if not amp.enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp.dtype)
