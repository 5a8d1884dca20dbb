"""Typed configuration tree for controlnet-ray.

One dataclass per concern (data, model, optimisation, output, Ray).  The CLI in
:mod:`controlnet_ray.cli` fills it from the original script's flags; everything
else in the package reads only these objects, never ``argparse.Namespace`` or globals.
Validation lives here so that a bad value fails before Ray (or any heavy import) starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LOSS_TYPES = ("mse", "l1", "combined")
ENCODERS = ("auto", "iresnet", "resnet50", "cnn")
IRESNET_DEPTHS = (18, 34, 50, 100)
PAIR_MODES = ("front_to_video", "any")
FRAMINGS = ("head", "arcface")
GENERATORS = ("warp", "plain")
BEST_METRICS = ("val_psnr", "val_loss")
PROGRESS_MODES = ("auto", "bar", "lines")
DEVICE_CHOICES = ("cpu", "cuda", "auto")  # --device of the inference CLIs and benchmarks


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and what is allowed."""


@dataclass
class DataConfig:
    """Where the data comes from and how it is turned into training pairs."""

    data_dir: str | None = None  # None: the embedded synthetic dataset
    image_dir: str | None = None
    batch_size: int = 16
    num_workers: int = 4  # data-loading parallelism (the original's DataLoader workers)
    image_size: int = 112
    pair_mode: Literal["front_to_video", "any"] = "front_to_video"
    min_pose_distance: float = 5.0  # degrees, original rule
    max_pose_distance: float = 90.0
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    skip_bad_images: bool = False
    # crop framing: "head" centres the fitted 3D head (same place and size at every pose);
    # "arcface" is the 5-point similarity alignment identity encoders were trained on
    framing: Literal["head", "arcface"] = "head"
    cache_dir: str | None = (
        None  # shards and the synthetic dataset; default ~/.cache/controlnet_ray
    )
    synthetic_identities: int = 40
    synthetic_frames: int = 16
    synthetic_seed: int = 0

    def resolved_cache_dir(self) -> Path:
        """Cache root: explicit flag, then $CONTROLNET_RAY_CACHE, then ~/.cache/controlnet_ray."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().resolve()
        env = os.environ.get("CONTROLNET_RAY_CACHE")
        if env:
            return Path(env).expanduser().resolve()
        return Path.home() / ".cache" / "controlnet_ray"


@dataclass
class ModelConfig:
    """ImageControlNet architecture (see controlnet_ray.model)."""

    image_size: int = 112
    feature_dim: int = 512  # width of the global identity code
    pose_dim: int = 3
    num_control_layers: int = 3
    freeze_generator: bool = False
    encoder: Literal["auto", "iresnet", "resnet50", "cnn"] = "auto"
    encoder_weights: str | None = None  # local .pth or .onnx; nothing is downloaded
    iresnet_depth: int = 50
    freeze_backbone: bool = False
    base_channels: int = 32  # width of the generator/cnn encoder at full resolution
    # "warp": warp-and-refine from a 3D head proxy (needs --framing head); "plain": the seed's
    # U-Net whose skips carry the source's layout (checkpoints from before this field)
    generator: Literal["warp", "plain"] = "warp"
    # frozen ArcFace (local .onnx/.pth) scoring identity for --identity_loss_weight; kept out of
    # the model's parameters and checkpoints
    identity_weights: str | None = None


@dataclass
class OptimConfig:
    """Loss, optimiser and numerics of the training step."""

    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 1e-5
    pose_loss_weight: float = 0.1
    loss_type: Literal["mse", "l1", "combined"] = "mse"
    identity_loss_weight: float = 0.0
    # image-loss weight of pixels outside the target's head: a video frame's background cannot
    # be predicted from the ID photo, so it should not take the generator's capacity
    background_loss_weight: float = 0.1
    # weight of the generator's hinge adversarial term against a patch discriminator
    # (model.discriminator); 0 = off: no discriminator is built, trained or saved
    adversarial_loss_weight: float = 0.0
    # the discriminator's peak Adam learning rate; it follows --lr's warm-up and cosine
    disc_lr: float = 2e-4
    use_amp: bool = False
    gradient_accumulation_steps: int = 1
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 20  # abort after this many non-finite losses in a row
    warmup_epochs: int = 1


@dataclass
class OutputConfig:
    """What the run leaves behind, named as the original names it."""

    resume: str | None = None
    save_dir: str = "checkpoints_image"
    log_dir: str = "logs_image"
    save_interval: int = 10
    image_log_interval: int = 10  # epochs between Images/* summaries
    best_metric: Literal["val_psnr", "val_loss"] = "val_psnr"
    # console: "auto" draws an in-epoch bar when a terminal is attached; "lines" never does
    progress: Literal["auto", "bar", "lines"] = "auto"
    # skip the independent judges (controlnet_ray.judging) in each epoch's validation report
    no_judge: bool = False


@dataclass
class RayOptions:
    """How the run is placed on Ray; none of these exist in the original script."""

    num_ray_workers: int = 1
    use_gpu: bool = False
    address: str | None = None
    run_name: str | None = None  # default: derived from save_dir, stable across re-runs
    storage_path: str | None = None  # default: <save_dir>/ray_results
    seed: int = 42
    max_failures: int = 2
    num_to_keep: int = 2
    fresh: bool = False  # ignore an existing Ray checkpoint of the same run
    cpus_per_worker: float | None = None  # None: planned from the machine
    # connected cluster short of resources: seconds to wait for its autoscaler (0: fail at once)
    resource_wait_s: float = 600.0


@dataclass
class TrainConfig:
    """The whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayOptions = field(default_factory=RayOptions)

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the flag for the first invalid value; return self."""
        _validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; unknown keys (from newer versions) are rejected by name, and
        fields missing from an older dict take their old behaviour (``_LEGACY_DEFAULTS``)."""
        parts = {}
        for f in dataclasses.fields(cls):
            sub_cls = {
                "data": DataConfig,
                "model": ModelConfig,
                "optim": OptimConfig,
                "output": OutputConfig,
                "ray": RayOptions,
            }[f.name]
            values = dict(d.get(f.name, {}))
            known = {sf.name for sf in dataclasses.fields(sub_cls)}
            unknown = set(values) - known
            if unknown:
                raise ConfigError(f"unknown config keys in section {f.name!r}: {sorted(unknown)}")
            if "split_ratios" in values:
                values["split_ratios"] = tuple(values["split_ratios"])
            values = {**_LEGACY_DEFAULTS.get(f.name, {}), **values}
            parts[f.name] = sub_cls(**values)
        return cls(**parts)

    def run_name(self) -> str:
        """Stable Ray run name: same save_dir -> same name, so re-running resumes."""
        if self.ray.run_name:
            return self.ray.run_name
        resolved = str(Path(self.output.save_dir).expanduser().resolve())
        digest = hashlib.sha1(resolved.encode("utf-8")).hexdigest()[:8]
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(resolved).name)
        return f"controlnet_{stem or 'run'}_{digest}"

    def storage_path(self) -> str:
        """Ray Train storage root; URIs (s3://, gs://) pass through untouched."""
        if self.ray.storage_path:
            sp = self.ray.storage_path
            return sp if "://" in sp else str(Path(sp).expanduser().resolve())
        return str((Path(self.output.save_dir).expanduser() / "ray_results").resolve())

    def effective_batch_size(self) -> int:
        return (
            self.data.batch_size * self.ray.num_ray_workers * self.optim.gradient_accumulation_steps
        )


#: Values of fields added after checkpoints were first written, for configs that lack them:
#: a stored config describes what that run did, so a missing field means the old behaviour.
_LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"framing": "arcface"},
    "model": {"generator": "plain"},
    "optim": {"background_loss_weight": 1.0},
}


def _finite_floats(cfg: TrainConfig) -> None:
    """Every float flag must be a finite number: NaN and inf pass ``x < 0`` / ``not x > 0``
    style checks and would train (and save) a broken model. Walks all sections, so fields
    added later are covered without being listed here."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            values = value if isinstance(value, tuple | list) else (value,)
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"--{f.name} must be a finite number, got {_shown(value)}")


def _shown(value: object) -> str:
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value)
    return str(value)


def _positive(value: float, flag: str) -> None:
    if not value > 0:
        raise ConfigError(f"{flag} must be > 0, got {value}")


def _choice(value: object, flag: str, allowed: tuple) -> None:
    if value not in allowed:
        allowed_s = ", ".join(str(a) for a in allowed)
        raise ConfigError(f"{flag} must be one of {{{allowed_s}}}, got {value!r}")


def _validate(cfg: TrainConfig) -> None:
    d, m, o, out, r = cfg.data, cfg.model, cfg.optim, cfg.output, cfg.ray
    _finite_floats(cfg)
    _positive(d.batch_size, "--batch_size")
    if d.num_workers < 0:
        raise ConfigError(f"--num_workers must be >= 0, got {d.num_workers}")
    _positive(d.image_size, "--image_size")
    if d.image_size % 16:
        raise ConfigError(f"--image_size must be divisible by 16, got {d.image_size}")
    if d.data_dir is not None and not Path(d.data_dir).is_dir():
        raise ConfigError(f"--data_dir does not exist or is not a directory: {d.data_dir}")
    if d.image_dir is not None and not Path(d.image_dir).is_dir():
        raise ConfigError(f"--image_dir does not exist or is not a directory: {d.image_dir}")
    _choice(d.pair_mode, "--pair_mode", PAIR_MODES)
    _choice(d.framing, "--framing", FRAMINGS)
    if not 0 <= d.min_pose_distance <= d.max_pose_distance:
        raise ConfigError(
            "--min_pose_distance/--max_pose_distance must satisfy 0 <= min <= max, got "
            f"{d.min_pose_distance}, {d.max_pose_distance}"
        )
    if len(d.split_ratios) != 3 or any(x < 0 for x in d.split_ratios) or sum(d.split_ratios) <= 0:
        raise ConfigError(
            f"--split_ratios must be three non-negative numbers, got {d.split_ratios}"
        )
    _positive(d.synthetic_identities, "--synthetic_identities")
    _positive(d.synthetic_frames, "--synthetic_frames")
    _positive(m.feature_dim, "--feature_dim")
    if m.pose_dim != 3:
        raise ConfigError(f"--pose_dim must be 3 (yaw, pitch, roll), got {m.pose_dim}")
    if m.num_control_layers < 1 or m.num_control_layers > 5:
        raise ConfigError(f"--num_control_layers must be in 1..5, got {m.num_control_layers}")
    _choice(m.encoder, "--encoder", ENCODERS)
    _choice(m.generator, "--generator", GENERATORS)
    if m.generator == "warp" and d.framing != "head":
        raise ConfigError(
            "--generator warp needs --framing head (its 3D proxy assumes head-centred crops); "
            "use --generator plain with --framing arcface"
        )
    _choice(m.iresnet_depth, "--iresnet_depth", IRESNET_DEPTHS)
    if m.encoder_weights is not None and not Path(m.encoder_weights).is_file():
        raise ConfigError(f"--encoder_weights file not found: {m.encoder_weights}")
    _positive(o.epochs, "--epochs")
    _positive(o.lr, "--lr")
    if o.weight_decay < 0:
        raise ConfigError(f"--weight_decay must be >= 0, got {o.weight_decay}")
    if o.pose_loss_weight < 0:
        raise ConfigError(f"--pose_loss_weight must be >= 0, got {o.pose_loss_weight}")
    if not 0 <= o.background_loss_weight <= 1:
        raise ConfigError(
            f"--background_loss_weight must be in [0, 1], got {o.background_loss_weight}"
        )
    if o.identity_loss_weight < 0:
        raise ConfigError(f"--identity_loss_weight must be >= 0, got {o.identity_loss_weight}")
    if o.identity_loss_weight > 0 and m.identity_weights is None:
        raise ConfigError(
            f"--identity_loss_weight {o.identity_loss_weight} needs --identity_weights "
            "(a local ArcFace .onnx or .pth; nothing is downloaded)"
        )
    if m.identity_weights is not None and not Path(m.identity_weights).is_file():
        raise ConfigError(f"--identity_weights file not found: {m.identity_weights}")
    if o.adversarial_loss_weight < 0:
        raise ConfigError(
            f"--adversarial_loss_weight must be >= 0 (0 = off), got {o.adversarial_loss_weight}"
        )
    _positive(o.disc_lr, "--disc_lr")
    _choice(o.loss_type, "--loss_type", LOSS_TYPES)
    _positive(o.gradient_accumulation_steps, "--gradient_accumulation_steps")
    _positive(o.grad_clip, "--grad_clip")
    _positive(out.save_interval, "--save_interval")
    _positive(out.image_log_interval, "--image_log_interval")
    _choice(out.best_metric, "--best_metric", BEST_METRICS)
    _choice(out.progress, "--progress", PROGRESS_MODES)
    if out.resume is not None and not Path(out.resume).is_file():
        raise ConfigError(f"--resume checkpoint not found: {out.resume}")
    _positive(r.num_ray_workers, "--num_ray_workers")
    if r.max_failures < 0:
        raise ConfigError(f"--max_failures must be >= 0, got {r.max_failures}")
    _positive(r.num_to_keep, "--num_to_keep")
    if r.cpus_per_worker is not None:
        _positive(r.cpus_per_worker, "--cpus_per_worker")
    if r.resource_wait_s < 0:
        raise ConfigError(f"--resource_wait_s must be >= 0, got {r.resource_wait_s:g}")
