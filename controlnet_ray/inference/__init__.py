"""What generate, evaluate and export share: model loading, image I/O, face preparation, runners.

* Loading: a training checkpoint (``.pth``) becomes an eval-mode :class:`ImageControlNet` built
  from the config stored in the file, never from the current machine's flags; an exported
  ``.onnx`` is run with onnxruntime.  Both are behind :class:`Runner` so the CLIs do not care.
* Faces: an image is either an aligned crop (already ``image_size`` square, or ``--aligned``) or
  a photo, which is detected (``data.detect``) or given 5 landmarks, then aligned exactly as the
  training data were (``data.align``).  A photo's source pose is estimated from its landmarks
  as the training data's single-image estimates were (``data.pose.PhotoPoseModel``: the mean
  face and bias the checkpoint carries; older checkpoints: the default mean face).
* Poses are (yaw, pitch, roll) in degrees, :mod:`controlnet_ray.data.geometry`'s convention.
  Targets outside :data:`POSE_LIMITS_DEG` are refused, not clamped: no model has seen them,
  and a silently clamped angle would look like a model error.  Targets beyond the poses the
  model was trained on (the checkpoint's, else :data:`DOCUMENTED_TRAINED_RANGE_DEG`) are
  warned about (:func:`beyond_training`).


Modules: ``poses`` (accepted and trained ranges, ``--sweep``), ``images`` (files, model range,
captioned grids), ``faces`` (crop and source pose of an image), ``loading`` (``.pth`` ->
model), ``onnx_format`` (the export's names and metadata), ``runners`` (PyTorch / ONNX behind
one interface), ``errors`` and ``cli_frame`` (how the commands fail). The names below are what the
commands and tests import.

torch is imported inside functions only, so CLIs can validate their arguments first.
"""

from controlnet_ray.inference.cli_frame import run_cli
from controlnet_ray.inference.errors import InferenceError
from controlnet_ray.inference.faces import PreparedFace, parse_landmarks, prepare_face
from controlnet_ray.inference.images import (
    IMAGE_EXTENSIONS,
    check_output_path,
    grid,
    label_tile,
    list_images,
    read_image,
    to_model_input,
    to_rgb8,
    write_image,
)
from controlnet_ray.inference.loading import LoadedModel, load_model, resolve_torch_device
from controlnet_ray.inference.onnx_format import (
    INPUT_RANGE,
    META_CONVENTION,
    META_FORMAT,
    META_FRAMING,
    META_IMAGE_SIZE,
    META_INPUT_RANGE,
    META_POSE_ESTIMATE,
    META_POSE_LIMITS,
    META_SIGNATURE,
    META_SOURCE,
    ONNX_FORMAT,
    ONNX_INPUTS,
    ONNX_OUTPUT,
)
from controlnet_ray.inference.poses import (
    AXES,
    DOCUMENTED_TRAINED_RANGE_DEG,
    POSE_CONVENTION,
    POSE_LIMITS_DEG,
    Sweep,
    beyond_training,
    check_pose,
    format_pose,
    parse_sweep,
)
from controlnet_ray.inference.runners import Runner, open_runner, run_batched

__all__ = [
    "AXES",
    "DOCUMENTED_TRAINED_RANGE_DEG",
    "IMAGE_EXTENSIONS",
    "INPUT_RANGE",
    "META_CONVENTION",
    "META_FORMAT",
    "META_FRAMING",
    "META_IMAGE_SIZE",
    "META_INPUT_RANGE",
    "META_POSE_LIMITS",
    "META_SIGNATURE",
    "META_POSE_ESTIMATE",
    "META_SOURCE",
    "ONNX_FORMAT",
    "ONNX_INPUTS",
    "ONNX_OUTPUT",
    "POSE_CONVENTION",
    "POSE_LIMITS_DEG",
    "InferenceError",
    "LoadedModel",
    "PreparedFace",
    "Runner",
    "Sweep",
    "beyond_training",
    "check_output_path",
    "check_pose",
    "format_pose",
    "grid",
    "label_tile",
    "list_images",
    "load_model",
    "open_runner",
    "parse_landmarks",
    "parse_sweep",
    "prepare_face",
    "read_image",
    "resolve_torch_device",
    "run_batched",
    "run_cli",
    "to_model_input",
    "to_rgb8",
    "write_image",
]
