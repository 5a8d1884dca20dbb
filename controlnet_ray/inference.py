"""What generate, evaluate and export share: model loading, image I/O, face preparation, runners.

* Loading: a training checkpoint (``.pth``) becomes an eval-mode :class:`ImageControlNet` built
  from the config stored in the file, never from the current machine's flags; an exported
  ``.onnx`` is run with onnxruntime.  Both are behind :class:`Runner` so the CLIs do not care.
* Faces: an image is either an aligned crop (already ``image_size`` square, or ``--aligned``) or
  a photo, which is detected (``data.detect``) or given 5 landmarks, then aligned exactly as the
  training data were (``data.align``).  A photo's source pose is estimated from its landmarks
  with ``data.pose.estimate_pose_generic`` in the training data's convention.
* Poses are (yaw, pitch, roll) in degrees, :mod:`controlnet_ray.data.geometry`'s convention.
  Targets outside the training range (:data:`POSE_LIMITS_DEG`) are refused, not clamped: the
  model has never seen them, and a silently clamped angle would look like a model error.

torch is imported inside functions only, so CLIs can validate their arguments first.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import cv2
import numpy as np

if TYPE_CHECKING:
    import argparse

    import torch

    from controlnet_ray.config import ModelConfig, TrainConfig
    from controlnet_ray.data.detect import FaceDetector

AXES = ("yaw", "pitch", "roll")
# The training range: what the synthetic and real video data cover, and the pose head's scale.
POSE_LIMITS_DEG = {"yaw": 90.0, "pitch": 60.0, "roll": 60.0}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
POSE_CONVENTION = (
    "(yaw, pitch, roll) in degrees; R = Rz(roll) @ Rx(-pitch) @ Ry(yaw); 0 = facing the camera; "
    "yaw > 0 turns the nose towards the image's right, pitch > 0 lifts the nose, roll > 0 tilts "
    "the head counter-clockwise in the image (controlnet_ray.data.geometry)"
)
# Names shared by export (writer) and OnnxRunner (reader).
ONNX_INPUTS = ("image", "source_pose", "target_pose")
ONNX_OUTPUT = "output"
ONNX_FORMAT = "controlnet_ray.generator/1"
META_FORMAT = "controlnet_ray.format"
META_IMAGE_SIZE = "controlnet_ray.image_size"
META_CONVENTION = "controlnet_ray.pose_convention"
META_INPUT_RANGE = "controlnet_ray.input_range"
META_POSE_LIMITS = "controlnet_ray.pose_limits_deg"
META_FRAMING = "controlnet_ray.framing"  # absent in exports made before head framing: arcface
META_SIGNATURE = "controlnet_ray.model_signature"
META_SOURCE = "controlnet_ray.source_checkpoint"
INPUT_RANGE = (
    "RGB, NCHW float32 in [-1, 1] (pixel / 127.5 - 1), a crop framed as "
    f"metadata {META_FRAMING} says (head: the head-centred crop of data.align)"
)
RUN_BATCH = 16  # images per forward pass in the CLIs


class InferenceError(RuntimeError):
    """A user-facing problem (bad file, no face, bad angle); the message names file or flag."""


# --------------------------------------------------------------------------- poses


def check_pose(pose: Sequence[float], what: str) -> tuple[float, float, float]:
    """``pose`` as floats, or InferenceError naming ``what`` when outside the training range."""
    values = tuple(float(v) for v in pose)
    for axis, value in zip(AXES, values, strict=True):
        limit = POSE_LIMITS_DEG[axis]
        if not math.isfinite(value) or abs(value) > limit:
            raise InferenceError(
                f"{what} {axis} = {value:g} deg is outside the training range "
                f"(yaw +-{POSE_LIMITS_DEG['yaw']:g}, pitch +-{POSE_LIMITS_DEG['pitch']:g}, "
                f"roll +-{POSE_LIMITS_DEG['roll']:g}); angles are refused, not clamped"
            )
    return values  # type: ignore[return-value]


def format_pose(pose: Sequence[float]) -> str:
    return ", ".join(f"{a} {float(v):+.1f}" for a, v in zip(AXES, pose, strict=True))


@dataclass(frozen=True)
class Sweep:
    """One swept axis: ``yaw=-60:60:15`` (start:stop:step, stop included) or ``yaw=-30,0,30``."""

    axis: str
    values: tuple[float, ...]


MAX_SWEEP_VALUES = 181


def parse_sweep(text: str) -> Sweep:
    """Parse one ``--sweep`` value; InferenceError says what is wrong with it."""
    match = re.fullmatch(r"\s*(\w+)\s*=\s*(.+)", text)
    if not match or match.group(1) not in AXES:
        raise InferenceError(
            f"--sweep {text!r}: expected AXIS=START:STOP:STEP or AXIS=V1,V2,... with AXIS one "
            f"of {', '.join(AXES)} (e.g. yaw=-60:60:15)"
        )
    axis, spec = match.group(1), match.group(2)
    try:
        values = _range_values(spec) if ":" in spec else [float(v) for v in spec.split(",")]
    except ValueError as exc:
        raise InferenceError(f"--sweep {text!r}: {exc}") from None
    if not 1 <= len(values) <= MAX_SWEEP_VALUES:
        raise InferenceError(f"--sweep {text!r}: gives {len(values)} values (1..181 allowed)")
    return Sweep(axis, tuple(values))


def _range_values(spec: str) -> list[float]:
    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError("a range is START:STOP:STEP")
    start, stop, step = (float(p) for p in parts)
    if step == 0 or (stop - start) * step < 0 or not all(map(math.isfinite, (start, stop, step))):
        raise ValueError("STEP must be non-zero and point from START towards STOP")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_SWEEP_VALUES:
        raise ValueError(f"gives {count} values (1..{MAX_SWEEP_VALUES} allowed)")
    return [round(start + i * step, 9) for i in range(count)]


# --------------------------------------------------------------------------- image I/O


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file; InferenceError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)  # works for non-ASCII paths, unlike cv2.imread
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise InferenceError(f"{path}: not a readable image (corrupt, empty or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_output_path(path: str | Path, flag: str = "--out") -> Path:
    """The output file's folder must exist: outputs never create folders (typos stay visible)."""
    path = Path(path)
    if path.is_dir():
        raise InferenceError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise InferenceError(
            f"{flag} {path}: folder {path.parent} does not exist (create it first; outputs "
            "never create folders)"
        )
    return path


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Encode by suffix (png, jpg, webp, bmp) and write; InferenceError for other suffixes."""
    path = check_output_path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise InferenceError(f"--out {path}: unsupported image type {suffix or '(none)'}; use .png")
    ok, buf = cv2.imencode(suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InferenceError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())
    return path


def to_model_input(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] (the shards' normalisation)."""
    return (rgb.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def to_rgb8(chw: np.ndarray) -> np.ndarray:
    """Model output float [3, H, W] in [-1, 1] -> RGB uint8 [H, W, 3] (overshoot clipped)."""
    x = (np.asarray(chw, np.float32).transpose(1, 2, 0) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (by extension), sorted; InferenceError when none."""
    folder = Path(folder)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise InferenceError(f"--image {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return files


# --------------------------------------------------------------------------- faces


def parse_landmarks(text: str) -> np.ndarray:
    """``x1,y1,...,x5,y5`` (InsightFace order) -> [5, 2] float64."""
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) != 10 or not all(map(math.isfinite, values)):
        raise InferenceError(
            f"--landmarks {text!r}: expected 10 numbers x1,y1,...,x5,y5 (left eye, right eye, "
            "nose tip, left mouth corner, right mouth corner; image-left/right, pixels)"
        )
    return np.asarray(values, np.float64).reshape(5, 2)


@dataclass
class PreparedFace:
    """An aligned crop ready for the model, and where its source pose came from."""

    crop: np.ndarray  # RGB uint8 [S, S, 3]
    source_pose: tuple[float, float, float]
    pose_origin: str
    landmarks: np.ndarray | None = None  # [5, 2] in the original image, for photos


def prepare_face(
    image: np.ndarray,
    image_size: int,
    *,
    name: str,
    aligned: bool = False,
    landmarks: np.ndarray | None = None,
    source_pose: Sequence[float | None] = (None, None, None),
    detector: Callable[[], FaceDetector] | None = None,
    framing: str = "head",
) -> PreparedFace:
    """Aligned crop + source pose of one image (see the module docstring for the rules).

    ``source_pose`` entries that are not None override the estimate (or the 0 default of
    aligned crops) axis by axis.  ``detector`` is a factory so detectors load only when needed.
    """
    h, w = image.shape[:2]
    if landmarks is None and (aligned or (h, w) == (image_size, image_size)):
        crop = image if (h, w) == (image_size, image_size) else _resize(image, image_size)
        pose = tuple(0.0 if v is None else float(v) for v in source_pose)
        origin = "aligned crop: --source_yaw/--source_pitch/--source_roll (default 0)"
        return PreparedFace(crop, pose, origin)  # type: ignore[arg-type]
    if landmarks is None:
        landmarks = _detect_landmarks(image, name, detector)
        how = "detected landmarks"
    else:
        how = "--landmarks"
    return _align_photo(image, image_size, landmarks, source_pose, how, framing)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def _detect_landmarks(
    image: np.ndarray, name: str, detector: Callable[[], FaceDetector] | None
) -> np.ndarray:
    from controlnet_ray.data.detect import largest_face

    if detector is None:
        raise InferenceError(
            f"{name} is a {image.shape[1]}x{image.shape[0]} photo, not an aligned crop, and no "
            "face detector is available: pass --landmarks x1,y1,...,x5,y5, or --aligned if it "
            "is a crop, or --face_models DIR / pip install dlib-bin face-recognition-models"
        )
    face = largest_face(detector().detect(image))
    if face is None:
        raise InferenceError(
            f"{name}: no face found; pass --landmarks x1,y1,...,x5,y5 (or --aligned for a crop)"
        )
    return face.landmarks


def _align_photo(
    image: np.ndarray,
    image_size: int,
    landmarks: np.ndarray,
    source_pose: Sequence[float | None],
    how: str,
    framing: str,
) -> PreparedFace:
    from controlnet_ray.data.align import align_face, crop, head_crop_matrix
    from controlnet_ray.data.pose import MEAN_FACE_3D, estimate_pose_generic

    h, w = image.shape[:2]
    estimate = estimate_pose_generic(landmarks, w, h)
    pose = tuple(e if v is None else float(v) for e, v in zip(estimate, source_pose, strict=True))
    overridden = any(v is not None for v in source_pose)
    origin = f"estimated from {how} (data.pose generic PnP)" + (
        ", partly overridden by --source_*" if overridden else ""
    )
    if framing == "head":  # framed like the training data: on the head, from the pose
        matrix = head_crop_matrix(landmarks, np.asarray(estimate), w, h, MEAN_FACE_3D, image_size)
        face = crop(image, matrix, image_size)
    else:
        face = align_face(image, landmarks, image_size)
    return PreparedFace(face, pose, origin, np.asarray(landmarks, np.float64))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- model loading


def resolve_torch_device(name: str) -> torch.device:
    """:func:`controlnet_ray.engine.resolve_device`, its error as an InferenceError (exit 2)."""
    from controlnet_ray.engine import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as exc:
        raise InferenceError(str(exc)) from None


@dataclass
class LoadedModel:
    """An eval-mode model and the training config it was built from."""

    model: Any  # ImageControlNet
    config: TrainConfig
    path: Path
    signature: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.config.model.image_size)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Checkpoint -> eval-mode model on ``device``; CheckpointError naming the file otherwise.

    The architecture comes from the file's own config (legacy files: its ``args``).  Encoder
    weights are not re-read (the checkpoint holds every weight): the encoder kind is taken from
    the saved model signature, so a checkpoint keeps working where ``--encoder_weights`` is gone.
    """
    import torch

    from controlnet_ray.checkpoint import CheckpointError, check_model_compat, load_checkpoint
    from controlnet_ray.model import build_model, model_signature

    state = load_checkpoint(path)
    cfg = _train_config(state, Path(path))
    model_cfg = _inference_model_config(cfg.model, state, Path(path))
    cfg = dataclasses.replace(cfg, model=model_cfg)
    model = build_model(model_cfg)
    _match_iresnet_form(model, model_cfg, state["model_state_dict"])
    signature = model_signature(model_cfg)
    check_model_compat(state, model, signature)
    try:
        model.load_state_dict(state["model_state_dict"])
    except RuntimeError as exc:  # check_model_compat should have caught it; name the file
        raise CheckpointError(f"{path}: weights do not load: {exc}") from exc
    model.to(torch.device(device)).eval()
    return LoadedModel(model, cfg, Path(path), signature)


_BACKBONE = "encoder.backbone."


def _match_iresnet_form(model: Any, cfg: ModelConfig, sd: dict[str, Any]) -> None:
    """Rebuild an iresnet backbone in the form the checkpoint holds.

    Training with ``--encoder_weights`` from an InsightFace ``.onnx`` builds the BN-folded
    ("fused") iresnet, possibly with another input size and without the final feature BN;
    rebuilding from the config alone (no weights file) would give the unfused 112 px form.
    The form is read off the state dict: conv biases mean fused, the fc width gives the size.
    """
    if cfg.encoder != "iresnet" or f"{_BACKBONE}fc.weight" not in sd:
        return
    from torch import nn

    from controlnet_ray.model.encoders import IResNetEncoder
    from controlnet_ray.model.iresnet import iresnet

    fused = f"{_BACKBONE}conv1.bias" in sd
    input_size = 16 * round(math.sqrt(sd[f"{_BACKBONE}fc.weight"].shape[1] / 512))
    if not fused and input_size == model.encoder.backbone.input_size:
        return
    net = iresnet(cfg.iresnet_depth, input_size=input_size, fused=fused)
    if f"{_BACKBONE}features.weight" not in sd:
        net.features = nn.Identity()  # folded into fc by the ONNX export
    model.encoder = IResNetEncoder(cfg, net=net)


def _train_config(state: dict[str, Any], path: Path) -> TrainConfig:
    from controlnet_ray.checkpoint import CheckpointError
    from controlnet_ray.config import ConfigError, DataConfig, ModelConfig, TrainConfig

    try:
        if isinstance(state.get("config"), dict):
            return TrainConfig.from_dict(state["config"])
        args = state.get("args") or {}  # the original script's file: only its flags are known
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        model = ModelConfig(**{k: v for k, v in args.items() if k in fields and v is not None})
        return TrainConfig(data=DataConfig(image_size=model.image_size), model=model)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable config: {exc}") from exc


def _inference_model_config(cfg: ModelConfig, state: dict[str, Any], path: Path) -> ModelConfig:
    from controlnet_ray.checkpoint import CheckpointError

    signature = state.get("model_signature") or {}
    kind = signature.get("encoder") or (cfg.encoder if cfg.encoder != "auto" else None)
    if kind is None and not cfg.encoder_weights:
        kind = "cnn"  # what "auto" picks without weights
    if kind is None:
        raise CheckpointError(
            f"{path}: cannot tell which encoder the checkpoint holds (no model_signature and "
            "encoder 'auto' with --encoder_weights)"
        )
    return dataclasses.replace(cfg, encoder=kind, encoder_weights=None)


# --------------------------------------------------------------------------- runners


class Runner(Protocol):
    """Generator path of a model: aligned crops + poses -> images, all numpy, all [-1, 1]."""

    image_size: int
    framing: str  # how the model's training crops were framed (data.align)
    description: str

    def generate(
        self, images: np.ndarray, source_pose: np.ndarray, target_pose: np.ndarray
    ) -> np.ndarray: ...


class TorchRunner:
    """A ``.pth`` checkpoint run with PyTorch."""

    def __init__(self, loaded: LoadedModel, device: torch.device) -> None:
        self.loaded, self.device = loaded, device
        self.image_size = loaded.image_size
        self.framing = loaded.config.data.framing
        self.description = f"{loaded.path} (PyTorch on {device})"

    def generate(
        self, images: np.ndarray, source_pose: np.ndarray, target_pose: np.ndarray
    ) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.loaded.model.generate(
                *(_tensor(a, self.device) for a in (images, source_pose, target_pose))
            )
        return out.float().cpu().numpy()


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)


class OnnxRunner:
    """An exported ``.onnx`` generator run with onnxruntime (CUDA provider first when asked)."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        import onnxruntime as ort

        from controlnet_ray.data.detect import onnx_providers

        self.path = Path(path)
        if not self.path.is_file():
            raise InferenceError(f"--checkpoint {self.path}: file not found")
        providers = onnx_providers(device)  # DetectorError when cuda is asked for but absent
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise InferenceError(f"{self.path}: not a readable ONNX model: {exc}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        names = [i.name for i in self.session.get_inputs()]
        if meta.get(META_FORMAT) != ONNX_FORMAT or names != list(ONNX_INPUTS):
            raise InferenceError(
                f"{self.path}: not a controlnet_ray generator export (inputs {names}, metadata "
                f"{META_FORMAT}={meta.get(META_FORMAT)!r}); make one with controlnet_ray.export"
            )
        self.image_size = int(meta[META_IMAGE_SIZE])
        self.framing = meta.get(META_FRAMING, "arcface")
        self.metadata = dict(meta)
        provider = self.session.get_providers()[0]
        self.description = f"{self.path} (onnxruntime, {provider})"

    def generate(
        self, images: np.ndarray, source_pose: np.ndarray, target_pose: np.ndarray
    ) -> np.ndarray:
        feed = {
            name: np.ascontiguousarray(a, dtype=np.float32)
            for name, a in zip(ONNX_INPUTS, (images, source_pose, target_pose), strict=True)
        }
        return self.session.run([ONNX_OUTPUT], feed)[0]


def open_runner(path: str | Path, device: str = "auto") -> Runner:
    """``.onnx`` -> :class:`OnnxRunner`; anything else is read as a PyTorch checkpoint."""
    if Path(path).suffix.lower() == ".onnx":
        return OnnxRunner(path, device)
    torch_device = resolve_torch_device(device)
    return TorchRunner(load_model(path, torch_device), torch_device)


def run_batched(
    runner: Runner, images: np.ndarray, source_pose: np.ndarray, target_pose: np.ndarray
) -> np.ndarray:
    """``runner.generate`` in chunks of :data:`RUN_BATCH` (bounded memory for long sweeps)."""
    outs = [
        runner.generate(
            images[i : i + RUN_BATCH],
            source_pose[i : i + RUN_BATCH],
            target_pose[i : i + RUN_BATCH],
        )
        for i in range(0, len(images), RUN_BATCH)
    ]
    return np.concatenate(outs) if outs else np.zeros((0, 3, runner.image_size, runner.image_size))


# --------------------------------------------------------------------------- pictures


def label_tile(rgb: np.ndarray, text: str, min_size: int = 96) -> np.ndarray:
    """A tile upscaled to at least ``min_size`` px with a one-line caption strip below it."""
    scale = max(1, math.ceil(min_size / rgb.shape[0]))
    tile = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1) if scale > 1 else rgb
    strip = np.full((14, tile.shape[1], 3), 255, np.uint8)
    font_scale = 0.32 if tile.shape[1] < 140 else 0.4
    cv2.putText(
        strip, text, (2, 10), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA
    )
    return np.concatenate([tile, strip], axis=0)


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tiles (equal ``[H, W, 3]`` uint8 shapes) in rows with a white border and gaps; short rows
    end in white. The tiling is ``reporting.image_grid``'s; this only converts to and from
    numpy, so the PNG grids and TensorBoard's are laid out by one function."""
    import torch

    from controlnet_ray.reporting import image_grid

    chw = [[torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1) for t in r] for r in rows]
    return image_grid(chw, pad, fill=255).permute(1, 2, 0).contiguous().numpy()


# --------------------------------------------------------------------------- CLI frame

_Checked = TypeVar("_Checked")


def run_cli(
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
    validate: Callable[[argparse.Namespace], _Checked],
    run: Callable[[argparse.Namespace, _Checked], int],
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """Parse, validate, run: the frame of generate, evaluate and export, so they fail alike.

    A bad flag (InferenceError from ``validate``) and an expected failure while running
    (InferenceError, CheckpointError or one of ``errors``) print ``error: ...`` and give exit
    status 2; anything else is a bug and propagates.  ``validate`` runs before the checkpoint
    module (torch) is imported, so bad flags fail fast.
    """
    args = parser.parse_args(argv)
    try:
        checked = validate(args)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from controlnet_ray.checkpoint import CheckpointError  # imports torch: after validation

    try:
        return run(args, checked)
    except (InferenceError, CheckpointError, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
