"""Is an entry's geometry a face at all? Checks on the original layout's numbers, run by the
legacy reader before any image is decoded.

Finite numbers of the right shape can still be impossible: landmarks far outside the image,
all five collapsed onto one point, a mirrored face, or eyes farther apart than the image is
wide. Aligning such an entry gives an all-black crop (the similarity transform maps the
image out of the frame) and a nonsense pose, which would then be trained on as if real.

Landmark order is InsightFace's: eye, eye, nose, mouth corner, mouth corner, the first of
each pair on the image's left for an upright face.
"""

from __future__ import annotations

import numpy as np

# A landmark may lie this far outside the image (fraction of its larger side): detectors put
# points of faces cut by the frame slightly outside it.
OUTSIDE_MARGIN = 0.1
# Below this spread (largest distance between two landmarks, pixels) the points are collapsed.
MIN_SPREAD_PX = 4.0
# Inter-ocular distance over the eye-centre-to-mouth-centre distance: about 0.9 for a frontal
# face, towards 0 in full profile (both eyes project onto one point: the embedded 400-identity
# set has frames at 0.03) and up to ~1.6 at strong pitch. Above the upper bound the points do
# not describe a face; collapsed points are caught by MIN_SPREAD_PX.
MIN_EYE_MOUTH_RATIO = 0.0
# Mirrored: eye pair and mouth pair together reversed by more than this (in units of the
# eye-to-mouth distance; a mirrored frontal face gives about -1.6, any real pose > -0.05).
MIRROR_LIMIT = 0.2
MAX_EYE_MOUTH_RATIO = 4.0
# Keypoints (``*_keypoints.npy``) are landmarks normalised by ``standard_scale`` (unit
# radius for the mean front face); anything this large is corrupt, not a face.
MAX_ABS_KEYPOINT = 1e3


def landmark_problem(landmarks: np.ndarray, image_size: tuple[int, int]) -> str | None:
    """Why ``landmarks`` ([5,2] pixels, finite) cannot be a face in a ``(w, h)`` image."""
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
        return f"landmark {k} at ({lm[k, 0]:.1f}, {lm[k, 1]:.1f}) is outside the {w}x{h} image"
    spread = float(np.max(np.linalg.norm(lm[:, None] - lm[None], axis=-1)))
    if spread < MIN_SPREAD_PX:
        return f"landmarks collapsed onto one point (spread {spread:.2f} px)"
    eyes, mouth = lm[1] - lm[0], lm[4] - lm[3]
    down = (lm[3] + lm[4]) / 2 - (lm[0] + lm[1]) / 2
    if _lateral(eyes, down) + _lateral(mouth, down) < -MIRROR_LIMIT:
        return "landmarks mirrored (the eyes' and mouth corners' left/right order is reversed)"
    eye_px, mouth_px = float(np.linalg.norm(eyes)), float(np.linalg.norm(down))
    ratio = eye_px / mouth_px
    if not MIN_EYE_MOUTH_RATIO <= ratio <= MAX_EYE_MOUTH_RATIO or eye_px > max(w, h):
        return (
            f"implausible inter-ocular distance {eye_px:.1f} px (eye-to-mouth {mouth_px:.1f} px, "
            f"image {w}x{h})"
        )
    return None


def _lateral(pair: np.ndarray, down: np.ndarray) -> float:
    """Signed width of a left/right pair across the face's vertical axis, in units of that
    axis' length: about +0.8 for frontal eyes, near 0 in profile, negative when mirrored.
    Independent of in-plane rotation (a 2D cross product)."""
    length2 = float(down @ down)
    return float(pair[0] * down[1] - pair[1] * down[0]) / max(length2, 1e-12)


def keypoint_problem(keypoints: np.ndarray) -> str | None:
    """Why a [5,3] keypoint row cannot be a normalised face (finite values assumed)."""
    largest = float(np.max(np.abs(keypoints)))
    if largest > MAX_ABS_KEYPOINT:
        return f"keypoint value {largest:.3g} exceeds {MAX_ABS_KEYPOINT:g} (normalised units)"
    return None
