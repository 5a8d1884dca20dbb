"""The geometry and appearance types of a synthetic person: ellipsoid primitives, surface marks,
the identity itself, and the material codes the shader keys on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np

# Materials of the primitives (index into the albedo logic of _albedo).
SKIN, HAIR, LIPS, EAR, NECK, CLOTH, NOSE = range(7)


@dataclass(frozen=True, eq=False)
class Ellipsoid:
    """``|A (p - center)| = 1`` with ``A = diag(1/radii) @ axes.T``; axes are column vectors."""

    center: np.ndarray
    radii: np.ndarray
    material: int
    axes: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    a: np.ndarray = dataclasses.field(init=False, repr=False)
    quad: np.ndarray = dataclasses.field(init=False, repr=False)  # A^T A (gradient matrix)
    center32: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Precomputed once: the renderer uses them for every primitive of every image.
        a = np.diag(1.0 / np.asarray(self.radii, dtype=np.float64)) @ self.axes.T
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "quad", a.T @ a)
        object.__setattr__(self, "center32", np.asarray(self.center, dtype=np.float32))


@dataclass(frozen=True, eq=False)
class Detail:
    """An identity-specific mark on the head surface (head-frame mm).

    ``points``: mole/birthmark [[surface point]], scar [[end], [end]] (surface points),
    freckles [[band centre], [grating frequencies], [phases]], glasses [[eye dx, eye y, rim
    half-width]].
    """

    kind: Literal["mole", "freckles", "scar", "birthmark", "glasses"]
    points: np.ndarray  # [K,3], meaning per kind (above)
    radius: float
    color: tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class Identity:
    """One synthetic person: geometry (head frame, mm, y up, z to the viewer) and appearance."""

    head: tuple[Ellipsoid, ...]  # skull, jaw, nose bridge, tip, 2 alae, lips, 2 ears, hair...
    creases: tuple[tuple[int, int], ...]  # head primitive pairs whose crease is smoothed
    body: tuple[Ellipsoid, ...]
    landmarks_3d: np.ndarray  # [5,3]: image-left eye, image-right eye, nose tip, mouth corners
    skull_center: np.ndarray
    eye: tuple[float, float, float, float, float]  # dx, y, half-width, half-height, iris radius
    brow: tuple[float, float, float]  # gap above the eye, thickness, arch
    mouth: tuple[float, float, float]  # corner dx, y, lip half-height
    nose_tip: np.ndarray
    skin: np.ndarray
    iris: np.ndarray
    hair: np.ndarray
    lip: np.ndarray
    cloth: np.ndarray
    hairline: tuple[float, float, float, float, float, float]  # front, side, back, amp, freq, ph
    beard: float
    details: tuple[Detail, ...]
