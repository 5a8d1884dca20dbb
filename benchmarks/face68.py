"""The benchmarks' independent head-pose estimator: dlib's 68 points, PnP on a 3D mean face.

The project's poses come from five landmarks and a per-person bundle fit
(``controlnet_ray.data.pose``).  To check them on real faces, this estimator shares neither:
dlib's 68-point shape predictor (iBUG 300-W annotation, so the nose tip, nostrils, jaw and
eye contours are observed, none synthesised) and OpenCV's PnP (SQPnP start, Levenberg-Marquardt
refinement) on one 68-point 3D mean face for everybody.  Only the camera and the angle
convention are the project's (``data.geometry``: focal length = image width, yaw > 0 turns the
nose to the image's right), so that the numbers are comparable.

The 3D face is not part of this repository: the user provides it (``--face_model PATH``) in the
format of ``assets/model.txt`` of https://github.com/yinguobing/head-pose-estimation (MIT
licence of that repository).  Its values derive from OpenFace's 68-point mean shape, which is
licensed for academic, non-commercial use, so they are read at run time, for research use, and
never shipped here.  Like dlib's 68-point model, the face serves the benchmarks only; the
package never imports this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from controlnet_ray.data.geometry import FLIP, camera_matrix, ypr_from_rotation

# iBUG 68-point order: jaw 0-16, brows 17-26, nose bridge 27-30 (30: tip), nostrils 31-35,
# eyes 36-41 / 42-47 (image-left / image-right), mouth 48-67.
NOSE_TIP_68 = 30
FACE_MODEL_NUMBERS = 3 * 68
FACE_MODEL_REPO = "https://github.com/yinguobing/head-pose-estimation"
FACE_MODEL_FILE = f"assets/model.txt of {FACE_MODEL_REPO}"
#: The ``--face_model`` flag's help, shared by the benchmarks that take it.
FACE_MODEL_HELP = (
    f"68-point 3D mean face: a local copy of {FACE_MODEL_FILE} (204 numbers, one per line: "
    "68 x, then 68 y, then 68 z; MIT licence of that repository, values from OpenFace's mean "
    "shape, for research use; not shipped here)"
)


class FaceModelError(ValueError):
    """The 3D face model file is missing or malformed; the message names the file."""


def load_face_model(path: Path | str) -> np.ndarray:
    """The [68, 3] face of a ``model.txt``-format file, in the project's head frame.

    The file's frame is OpenCV's object frame (x image-right, y down, z away from the camera);
    the head frame is x image-right, y up, z towards the camera, with the origin at the nose tip
    (point 30), so the points are shifted to the nose tip and flipped in y and z.  Units are the
    file's (millimetre-like: about 65 between the eye centres).
    """
    path = Path(path)
    where = f"--face_model {path}"
    if not path.is_file():
        raise FaceModelError(f"{where}: no such file (it is {FACE_MODEL_FILE})")
    try:
        words = path.read_text().split()
        values = np.array([float(w) for w in words], np.float64)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FaceModelError(f"{where}: not a model.txt of numbers ({exc})") from None
    if values.size != FACE_MODEL_NUMBERS or not np.isfinite(values).all():
        raise FaceModelError(
            f"{where}: expected {FACE_MODEL_NUMBERS} finite numbers (68 x, 68 y, 68 z), got "
            f"{values.size} numbers, {int((~np.isfinite(values)).sum())} not finite"
        )
    raw = values.reshape(3, 68).T
    return (raw - raw[NOSE_TIP_68]) @ FLIP


def pnp_pose_68(
    points: np.ndarray, width: float, height: float, face: np.ndarray
) -> tuple[float, float, float]:
    """68 image points [68, 2] of a ``width`` x ``height`` image -> (yaw, pitch, roll) degrees
    of ``face`` ([68, 3], head frame, e.g. :func:`load_face_model`'s).

    SQPnP finds the global minimum of the algebraic error over all rotations (no depth-inverted
    local solution to fall into); Levenberg-Marquardt then minimises the reprojection error.
    """
    import cv2

    pts = np.asarray(points, np.float64).reshape(68, 1, 2)
    if not np.isfinite(pts).all():
        raise ValueError("68-point PnP: landmarks are not finite")
    obj = np.asarray(face, np.float64) @ FLIP  # OpenCV's object frame: y down, z away
    k = camera_matrix(width, height)
    ok, rvec, tvec = cv2.solvePnP(obj, pts, k, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        raise ValueError("68-point PnP found no pose")
    rvec, tvec = cv2.solvePnPRefineLM(obj, pts, k, None, rvec, tvec)
    # cam = R' FLIP p + t for head-frame p; the project's convention is cam = FLIP R p + t.
    rot_cv = cv2.Rodrigues(rvec)[0]
    return ypr_from_rotation(FLIP @ rot_cv @ FLIP)


class Landmarks68:
    """dlib's HOG face detector and 68-point shape predictor (``face-recognition-models``)."""

    def __init__(self) -> None:
        import dlib

        from controlnet_ray.data.detect import DLIB_LANDMARK_MODELS, face_recognition_models_dir

        model = Path(face_recognition_models_dir()) / DLIB_LANDMARK_MODELS[68]
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(model))

    def in_box(self, image_rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """[68, 2] points of the face in ``box`` (x1, y1, x2, y2), e.g. a prepared image's."""
        rect = self._dlib.rectangle(*(int(round(float(v))) for v in box))
        shape = self._predictor(np.ascontiguousarray(image_rgb), rect)
        return np.array([(q.x, q.y) for q in shape.parts()], np.float64)

    def largest_box(self, image_rgb: np.ndarray, upsample: int = 1) -> np.ndarray | None:
        """(x1, y1, x2, y2) of the largest face the HOG detector finds, or None."""
        rects = self._detector(np.ascontiguousarray(image_rgb), upsample)
        if len(rects) == 0:
            return None
        r = max(rects, key=lambda q: q.area())
        return np.array([r.left(), r.top(), r.right(), r.bottom()], np.float64)
