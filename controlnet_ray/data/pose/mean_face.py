"""The 5-point head frame: landmark indices, the mirror pairs, and the default mean face."""

from __future__ import annotations

import numpy as np

from controlnet_ray.data.geometry import ARCFACE_TEMPLATE_112

NOSE = 2
_PAIRS = ((0, 1), (3, 4))  # (image-left, image-right) eyes, mouth corners
_FREE_POINTS = (0, 1, 3, 4)  # the nose tip is the head-frame origin


def _build_mean_face() -> np.ndarray:
    """Default mean face (head frame, mm, nose tip at the origin), see MEAN_FACE_3D."""
    t = ARCFACE_TEMPLATE_112
    xy = np.stack([t[:, 0] - t[NOSE, 0], -(t[:, 1] - t[NOSE, 1])], axis=1)  # y up
    xy = 0.5 * (xy + xy[[1, 0, 2, 4, 3]] * np.array([-1.0, 1.0]))  # mirror-symmetrise
    xy[NOSE] = 0.0
    xy *= 63.0 / (xy[1, 0] - xy[0, 0])  # inter-ocular (pupil) distance 63 mm
    z = np.array([-30.0, -30.0, 0.0, -27.0, -27.0])  # pupils / mouth corners behind the nose tip
    return np.column_stack([xy, z])


#: Default mean face.  Its frontal (orthographic) view is exactly InsightFace's ArcFace 5-point
#: layout -- the average of frontal faces -- scaled to a 63 mm inter-ocular distance, so that a
#: frontal average face gets pitch 0; depths (pupils 30 mm, mouth corners 27 mm behind the nose
#: tip) are anthropometric estimates.  The legacy template instead puts the nose 13 mm below the
#: eyes (real faces: ~36 mm), which biases pitch.  Only a starting point: the dataset pass
#: replaces it with the mean of the bundle-adjusted shapes.
MEAN_FACE_3D = _build_mean_face()
