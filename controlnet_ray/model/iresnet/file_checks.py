"""What a weights file must agree on with the network: :class:`WeightsError` and the checks
that turn a file's block counts and fc width into a depth and input size (or fail naming it)."""

from __future__ import annotations

from pathlib import Path

from controlnet_ray.model.iresnet.network import IRESNET_LAYERS


class WeightsError(ValueError):
    """A weights file cannot be used; the message names the file and what is wrong."""


def depth_from_layers(layers: tuple[int, ...], source: str) -> int:
    """Map a per-stage block count back to the named depth, or fail naming the file."""
    for depth, spec in IRESNET_LAYERS.items():
        if tuple(layers) == spec:
            return depth
    raise WeightsError(
        f"{source}: iresnet with blocks per stage {tuple(layers)} is not one of "
        f"{ {d: s for d, s in IRESNET_LAYERS.items()} }"
    )


def _check_depth(file_depth: int, wanted: int | None, path: str | Path) -> None:
    if wanted is not None and wanted != file_depth:
        raise WeightsError(
            f"{path}: holds an iresnet{file_depth} but --iresnet_depth is {wanted}; "
            f"pass --iresnet_depth {file_depth}"
        )


def _input_size_from_fc(fc_in: int, source: str) -> int:
    side = int(round((fc_in / 512) ** 0.5))
    if side * side * 512 != fc_in:
        raise WeightsError(f"{source}: fc input width {fc_in} is not 512*s*s")
    return side * 16
