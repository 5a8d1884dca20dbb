"""Is an entry's geometry a face at all, and is it an unusual one? Checks on the original
layout's numbers, run by the legacy reader before any image is decoded.

Two kinds of finding, kept apart on purpose:

* **Impossible** (:func:`landmark_problem`, :func:`keypoint_problem`): geometry no camera and
  no detector can produce: landmarks far outside the image, all five collapsed onto one point,
  eyes farther apart than the image is large, keypoints of absurd size. Aligning such an entry
  gives an all-black crop and a nonsense pose, so it is a data error (or skipped under
  ``--skip_bad_images``).
* **Unusual** (:func:`landmark_oddity`): what a real head can show, only rarely. Near profile
  with pitch and roll, the eyes' and mouth corners' image order legitimately reverses; at a
  steep pitch the eye-to-mouth distance shrinks far below the inter-ocular one. Such an entry
  is kept and trained on, and recorded in the shard manifest.

Every threshold is calibrated by property tests (``tests/test_plausibility.py``): exact and
noisy projections of several face templates at any yaw (+-90), pitch and roll (+-45) and focal
length (0.5x to 3x the image width) must never be impossible.

Landmark order is InsightFace's: eye, eye, nose, mouth corner, mouth corner, the first of
each pair on the image's left for an upright frontal face.
"""

from __future__ import annotations

import numpy as np

# A landmark may lie this far outside the image (fraction of its larger side): detectors
# extrapolate the points of a face cut by the frame; half an image beyond it is no detection.
OUTSIDE_MARGIN = 0.5
# Below this spread (largest distance between two landmarks, pixels) the points are collapsed:
# no detector reports a face that small, and its crop would be one blurred pixel.
MIN_SPREAD_PX = 4.0
# Unusual: eye pair and mouth pair together reversed by more than this (in units of the
# eye-to-mouth distance; a mirrored frontal face gives about -1.6, a frontal face +1.6). A real
# head near profile reaches about -0.6 with pitch and roll, more with detector noise.
REVERSED_LIMIT = 0.2
# Unusual: inter-ocular distance over eye-centre-to-mouth-centre distance above this. About
# 0.9 for a frontal face, towards 0 in profile; it grows as pitch foreshortens the face (a
# shallow face at 45 degrees of pitch reaches ~4.5, a head seen from above or below more).
MAX_EYE_MOUTH_RATIO = 4.0
# Keypoints (``*_keypoints.npy``) are landmarks normalised by ``standard_scale`` (unit
# radius for the mean front face); anything this large is corrupt, not a face.
MAX_ABS_KEYPOINT = 1e3


def landmark_problem(landmarks: np.ndarray, image_size: tuple[int, int]) -> str | None:
    """Why ``landmarks`` ([5,2] pixels, finite) cannot be a face in a ``(w, h)`` image (None:
    they can, however unusual)."""
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    w, h = image_size
    margin = OUTSIDE_MARGIN * max(w, h)
    outside = np.flatnonzero(
        (lm[:, 0] < -margin)
        | (lm[:, 0] > w + margin)
        | (lm[:, 1] < -margin)
        | (lm[:, 1] > h + margin)
    )
    if len(outside):
        k = int(outside[0])
        return (
            f"landmark {k} at ({lm[k, 0]:.1f}, {lm[k, 1]:.1f}) is far outside the {w}x{h} image "
            f"(more than {OUTSIDE_MARGIN:.0%} of its larger side beyond its border)"
        )
    spread = float(np.max(np.linalg.norm(lm[:, None] - lm[None], axis=-1)))
    if spread < MIN_SPREAD_PX:
        return f"landmarks collapsed onto one point (spread {spread:.2f} px)"
    eye_px = float(np.linalg.norm(lm[1] - lm[0]))
    if eye_px > max(w, h):
        return f"eyes {eye_px:.1f} px apart, farther than the {w}x{h} image is large"
    return None


def landmark_oddity(landmarks: np.ndarray) -> str | None:
    """What is unusual about a face's ``landmarks`` ([5,2] pixels, already found possible by
    :func:`landmark_problem`), or None. Unusual entries are kept and recorded, never refused."""
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    eyes, mouth = lm[1] - lm[0], lm[4] - lm[3]
    down = (lm[3] + lm[4]) / 2 - (lm[0] + lm[1]) / 2
    if _lateral(eyes, down) + _lateral(mouth, down) < -REVERSED_LIMIT:
        return (
            "the eyes' and mouth corners' left/right order is reversed (a head near profile, "
            "or swapped landmarks)"
        )
    eye_px, mouth_px = float(np.linalg.norm(eyes)), float(np.linalg.norm(down))
    if eye_px > MAX_EYE_MOUTH_RATIO * mouth_px:
        return (
            f"inter-ocular distance {eye_px:.1f} px is over {MAX_EYE_MOUTH_RATIO:g}x the "
            f"eye-to-mouth distance {mouth_px:.1f} px (a steep pitch?)"
        )
    return None


def _lateral(pair: np.ndarray, down: np.ndarray) -> float:
    """Signed width of a left/right pair across the face's vertical axis, in units of that
    axis' length: about +0.8 for frontal eyes, near 0 in profile, negative when reversed.
    Independent of in-plane rotation (a 2D cross product)."""
    length2 = float(down @ down)
    return float(pair[0] * down[1] - pair[1] * down[0]) / max(length2, 1e-12)


def keypoint_problem(keypoints: np.ndarray) -> str | None:
    """Why a [5,3] keypoint row cannot be a normalised face (finite values assumed)."""
    largest = float(np.max(np.abs(keypoints)))
    if largest > MAX_ABS_KEYPOINT:
        return f"keypoint value {largest:.3g} exceeds {MAX_ABS_KEYPOINT:g} (normalised units)"
    return None
