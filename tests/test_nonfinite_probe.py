"""benchmarks/nonfinite_probe.py's tracer points at the module whose backward makes a NaN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class NanBackward(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a kernel that breaks only in backward)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g * float("nan")


class Breaks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NanBackward.apply(x)


def test_the_first_bad_gradient_is_placed_between_the_right_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from nonfinite_probe import Tracer

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), Breaks(), nn.Linear(4, 4), nn.ReLU())
    tracer = Tracer(model)
    model(torch.randn(3, 4)).sum().backward()
    assert tracer.forward_bad == []  # the forward is clean
    assert tracer.first_bad_gradient() == "between 2 and 1"  # made in Breaks' backward
    assert not torch.isfinite(model[0].weight.grad).all()
    assert torch.isfinite(model[3].weight.grad).all()
