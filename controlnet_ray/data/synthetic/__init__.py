"""Embedded synthetic multi-view face dataset, rendered on first use.

Why: the service must train and demo without any real data, and the model must learn to use
the *source* image (identity) and not only the target pose. So every identity is a procedurally
built 3D head (union of ellipsoids: skull, jaw, nose, lips, ears, hair shell; neck and shoulders
in an unrotated body frame) with its own shape, colours, hairline and one or two distinctive
surface marks (mole, freckles, scar, birthmark, glasses), rendered at *known* yaw/pitch/roll.

Rendering is per-pixel analytic ray casting in numpy (rays are taken into the head frame, where
every ellipsoid intersection is a closed-form quadratic), z-buffered across primitives so large
yaw self-occludes naturally, shaded with wrapped Lambert + ambient, 2x supersampled. Poses,
camera and landmarks follow :mod:`controlnet_ray.data.geometry` exactly (focal = image width).

Per identity the dataset has one near-frontal "ID photo" (plain light background, even frontal
light) and a "phone video": a smooth pose trajectory with cluttered drifting background, moving
coloured light and a little sensor noise. Files are written in the original on-disk layout via
:func:`controlnet_ray.data.layout.write_legacy_dataset`, plus ``ROOT/ground_truth.json`` with the
true poses and per-person 3D 5-point geometry for evaluating the pose estimator.

Modules, in the order an image is made: ``spec`` (what to render, the cache key), ``shapes``
(primitive, mark and identity types), ``identity`` (drawing a person), ``raycast`` (hits,
normals, surface probes), ``shading`` (texture and light), ``background``, ``render`` (one image),
``views`` (ID photo and video of one identity), ``dataset`` (files on disk and the cache).

Cache key: ``SyntheticSpec.digest()`` hashes the spec's fields and ``spec.RENDER_VERSION`` only,
never the source, so moving code between these modules keeps every cached dataset valid; bump
``RENDER_VERSION`` whenever a change in any of them changes the rendered bytes.
"""

from controlnet_ray.data.synthetic.dataset import ensure_synthetic_dataset, render_dataset
from controlnet_ray.data.synthetic.identity import make_identity
from controlnet_ray.data.synthetic.render import render_face
from controlnet_ray.data.synthetic.shapes import Identity
from controlnet_ray.data.synthetic.spec import Background, Lighting, Placement, SyntheticSpec
from controlnet_ray.data.synthetic.views import (
    front_view,
    identity_rngs,
    person_name,
    render_view,
    video_views,
)

__all__ = [
    "Background",
    "Identity",
    "Lighting",
    "Placement",
    "SyntheticSpec",
    "ensure_synthetic_dataset",
    "front_view",
    "identity_rngs",
    "make_identity",
    "person_name",
    "render_dataset",
    "render_face",
    "render_view",
    "video_views",
]
