"""The config sections, one dataclass per concern: data, model, optimisation, output, Ray.

Each field is an :func:`~controlnet_ray.config.options.option` carrying its flag's help, so
the CLIs are generated from these classes. Each section checks its own values at construction
(:class:`~controlnet_ray.config.checks._Section`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from controlnet_ray.config.checks import ConfigError, _at_least_zero, _positive, _Section
from controlnet_ray.config.choices import (
    BestMetric,
    EncoderName,
    FillSeed,
    Framing,
    GeneratorName,
    HeadProxy,
    HeadShape,
    IResNetDepth,
    LossType,
    PairMode,
    ProgressMode,
    SeenSide,
)
from controlnet_ray.config.options import option


@dataclass
class DataConfig(_Section):
    """Where the data comes from and how it is turned into training pairs."""

    data_dir: str | None = option(
        None,
        "folder with front/video metadata JSON and keypoint .npy (the original layout); "
        "absent: embedded synthetic dataset",
        original=True,
    )
    image_dir: str | None = option(
        None,
        "root the metadata's relative image paths hang from "
        "(default: the ancestor of data_dir that contains train/)",
        original=True,
    )
    batch_size: int = option(16, "per-worker batch size", original=True)
    num_workers: int = option(
        4,
        "data-loading parallelism (shard preparation processes, decode concurrency)",
        original=True,
    )
    image_size: int = option(
        112, "aligned crop size, also the model's input size; divisible by 16", original=True
    )
    pair_mode: PairMode = option(
        "front_to_video",
        "source -> target pairs: front_to_video = a person's front photo -> one of their video "
        "frames (the original rule); any = every ordered pair of a person's images",
    )
    min_pose_distance: float = option(5.0, "least head-pose distance of a pair, degrees")
    max_pose_distance: float = option(90.0, "largest head-pose distance of a pair, degrees")
    split_ratios: tuple[float, float, float] = option(
        (0.7, 0.15, 0.15),
        "person-level train/val/test split (normalised)",
        metavar=("TRAIN", "VAL", "TEST"),
    )
    skip_bad_images: bool = option(False, "skip unreadable images (counted) instead of failing")
    framing: Framing = option(
        "head",
        "crop framing: head = the fitted 3D head at the same place and size at every pose; "
        "arcface = 5-point ArcFace alignment (what identity encoders were trained on)",
    )
    cache_dir: str | None = option(
        None,
        "cache for shards and the synthetic set "
        "(default $CONTROLNET_RAY_CACHE, else ~/.cache/controlnet_ray)",
    )
    synthetic_identities: int = option(40, "embedded dataset: number of identities")
    synthetic_frames: int = option(16, "embedded dataset: video frames per identity")
    synthetic_seed: int = option(0, "embedded dataset: random seed of the rendered heads")

    def _check(self) -> None:
        _positive(self.batch_size, "--batch_size")
        _at_least_zero(self.num_workers, "--num_workers")
        _positive(self.image_size, "--image_size")
        if self.image_size % 16:
            raise ConfigError(f"--image_size must be divisible by 16, got {self.image_size}")
        if not 0 <= self.min_pose_distance <= self.max_pose_distance:
            raise ConfigError(
                "--min_pose_distance/--max_pose_distance must satisfy 0 <= min <= max, got "
                f"{self.min_pose_distance}, {self.max_pose_distance}"
            )
        r = self.split_ratios
        if len(r) != 3 or any(x < 0 for x in r) or sum(r) <= 0:
            raise ConfigError(f"--split_ratios must be three non-negative numbers, got {r}")
        _positive(self.synthetic_identities, "--synthetic_identities")
        _positive(self.synthetic_frames, "--synthetic_frames")

    def resolved_cache_dir(self) -> Path:
        """Cache root: explicit flag, then $CONTROLNET_RAY_CACHE, then ~/.cache/controlnet_ray."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().resolve()
        env = os.environ.get("CONTROLNET_RAY_CACHE")
        if env:
            return Path(env).expanduser().resolve()
        return Path.home() / ".cache" / "controlnet_ray"


@dataclass
class ModelConfig(_Section):
    """ImageControlNet architecture (see controlnet_ray.model)."""

    # The model is built from this section alone, so it holds its input size; in a TrainConfig
    # it is --image_size, the data section's crop size (TrainConfig checks that they agree).
    image_size: int = option(112, "the model's input size", shared=True)
    feature_dim: int = option(512, "global code width", original=True)
    pose_dim: int = option(3, "pose dims (yaw,pitch,roll)", original=True)
    num_control_layers: int = option(
        3, "control injections into the generator (1..5)", original=True
    )
    freeze_generator: bool = option(
        False,
        "train only the encoder, control branch, pose head and learned head shape",
        original=True,
    )
    encoder: EncoderName = option(
        "auto", "auto: iresnet when --encoder_weights is given, else the small cnn"
    )
    encoder_weights: str | None = option(
        None, "local ArcFace .onnx/.pth or torchvision ResNet-50 .pth (never downloaded)"
    )
    iresnet_depth: IResNetDepth = option(50, "depth of the iresnet encoder")
    freeze_backbone: bool = option(False, "freeze the pretrained encoder, BatchNorm stats included")
    base_channels: int = option(32, "width of the generator and cnn encoder at full resolution")
    generator: GeneratorName = option(
        "warp",
        "warp = warp the source by a 3D head proxy and refine (needs --framing head); "
        "plain = the seed's U-Net (checkpoints from before this flag)",
    )
    fill_seed: FillSeed = option(
        "copy",
        "what the warp generator fills the head the source did not show from: copy = source "
        "pixels copied through a learned flow that starts at the same height of the head's "
        "seen side, blended with a head_colour fill by a learned mask (recognisable, textured); "
        "head_colour = a predicted residual on the source head's mean colour (checkpoints "
        "before copy); latitude = a predicted residual on the source at that seen-side point",
    )
    seen_side: SeenSide = option(
        "spread",
        "where the copy and latitude fills look for a hidden head point on the source's seen "
        "side: spread = the further round the head, the nearer the silhouette (an ear or the "
        "hair at the side, seen edge-on in a frontal photo); clamp = all at the same 55 deg "
        "(checkpoints before spread)",
    )
    head_shape: HeadShape = option(
        "learned",
        "the warp generator's 3D head proxy: learned = each person's own ellipsoid, read "
        "(bounded) from the source image; fixed = one ellipsoid for every head (checkpoints "
        "before learned)",
    )
    head_proxy: HeadProxy = option(
        "skull_jaw",
        "the parts of the warp generator's 3D head proxy: skull_jaw = the head ellipsoid "
        "joined by a jaw, so the chin and the mouth turn with the head; skull = the head "
        "ellipsoid alone, which ends at the mouth (checkpoints before skull_jaw)",
    )
    identity_weights: str | None = option(
        None,
        "local ArcFace .onnx/.pth for the identity loss (frozen, kept out of the model's "
        "checkpoints, never downloaded)",
    )

    def _check(self) -> None:
        _positive(self.image_size, "--image_size")
        _positive(self.feature_dim, "--feature_dim")
        if self.pose_dim != 3:
            raise ConfigError(f"--pose_dim must be 3 (yaw, pitch, roll), got {self.pose_dim}")
        if not 1 <= self.num_control_layers <= 5:
            raise ConfigError(
                f"--num_control_layers must be in 1..5, got {self.num_control_layers}"
            )
        _positive(self.base_channels, "--base_channels")


@dataclass
class OptimConfig(_Section):
    """Loss, optimiser and numerics of the training step."""

    epochs: int = option(100, "training epochs", original=True)
    lr: float = option(
        1e-4, "peak AdamW learning rate (linear warm-up, then cosine)", original=True
    )
    weight_decay: float = option(1e-5, "AdamW weight decay", original=True)
    pose_loss_weight: float = option(0.1, "weight of the pose head's loss", original=True)
    loss_type: LossType = option("mse", "image loss", original=True)
    identity_loss_weight: float = option(
        0.0, "weight of the ArcFace identity loss (needs --identity_weights); 0 = off"
    )
    # a video frame's background cannot be predicted from the ID photo, so it should not take
    # the generator's capacity
    background_loss_weight: float = option(
        0.1, "image-loss weight of pixels outside the target's head, in [0, 1]"
    )
    adversarial_loss_weight: float = option(
        0.0,
        "weight of the hinge adversarial loss from a spectral-norm patch discriminator "
        "(trained and checkpointed with the model); 0 = off",
    )
    disc_lr: float = option(
        2e-4, "the discriminator's peak Adam learning rate (follows --lr's warm-up and cosine)"
    )
    use_amp: bool = option(
        False, "mixed precision: bf16 autocast, or fp16+GradScaler on old GPUs", original=True
    )
    gradient_accumulation_steps: int = option(1, "micro-batches per optimiser step", original=True)
    grad_clip: float = option(1.0, "gradient-norm clipping threshold")
    max_nonfinite_steps: int = option(
        20, "abort after this many non-finite losses in a row", cli=False
    )
    warmup_epochs: int = option(1, "epochs of linear learning-rate warm-up")
    compile: bool = option(
        False,
        "torch.compile the model for the training steps (evaluation stays eager): 1.52x the "
        "eager step on an H200 at batch 256; the first steps spend a minute or more compiling",
    )

    def _check(self) -> None:
        _positive(self.epochs, "--epochs")
        _positive(self.lr, "--lr")
        _at_least_zero(self.weight_decay, "--weight_decay")
        _at_least_zero(self.pose_loss_weight, "--pose_loss_weight")
        if not 0 <= self.background_loss_weight <= 1:
            raise ConfigError(
                f"--background_loss_weight must be in [0, 1], got {self.background_loss_weight}"
            )
        _at_least_zero(self.identity_loss_weight, "--identity_loss_weight")
        _at_least_zero(self.adversarial_loss_weight, "--adversarial_loss_weight", " (0 = off)")
        _positive(self.disc_lr, "--disc_lr")
        _positive(self.gradient_accumulation_steps, "--gradient_accumulation_steps")
        _positive(self.grad_clip, "--grad_clip")


@dataclass
class OutputConfig(_Section):
    """What the run leaves behind, named as the original names it."""

    resume: str | None = option(None, "a .pth file to resume from", original=True)
    save_dir: str = option("checkpoints_image", "checkpoint folder", original=True)
    log_dir: str = option("logs_image", "TensorBoard log folder", original=True)
    save_interval: int = option(10, "epochs between checkpoint_epoch_N.pth files", original=True)
    image_log_interval: int = option(10, "epochs between Images/* TensorBoard summaries")
    best_metric: BestMetric = option(
        "val_psnr_face",
        "selects best_model.pth: val_psnr_face = validation PSNR over the face region (the "
        "head, not the video's background, which no ID photo predicts); val_psnr over the "
        "whole crop; val_loss",
    )
    progress: ProgressMode = option(
        "auto",
        "console progress: auto draws an in-epoch bar when a terminal is attached, "
        "bar always draws it (on stderr), lines prints only the per-epoch lines",
    )
    no_judge: bool = option(
        False,
        "skip the independent judges (held-out pose judge, identity, sharpness, trivial "
        "predictors) in each epoch's line",
    )

    def _check(self) -> None:
        _positive(self.save_interval, "--save_interval")
        _positive(self.image_log_interval, "--image_log_interval")


@dataclass
class RayOptions(_Section):
    """How the run is placed on Ray; none of these exist in the original script."""

    num_ray_workers: int = option(1, "training workers (DDP ranks)")
    use_gpu: bool = option(False, "one GPU per worker (a local Ray without GPUs fails fast)")
    address: str | None = option(
        None, "Ray cluster address; absent: $RAY_ADDRESS, else a local Ray"
    )
    run_name: str | None = option(
        None, "Ray run name (default: derived from --save_dir, stable across re-runs)"
    )
    storage_path: str | None = option(
        None,
        "Ray checkpoint storage (local path, NFS, s3://...); default save_dir/ray_results",
    )
    seed: int = option(42, "random seed (rank r seeds torch with seed + r)")
    max_failures: int = option(
        2, "worker failures Ray recovers from by restarting from the last checkpoint"
    )
    num_to_keep: int = option(2, "Ray checkpoints kept (best by --best_metric, plus the latest)")
    fresh: bool = option(False, "start over even if a Ray checkpoint of this run exists")
    cpus_per_worker: float | None = option(
        None, "CPUs reserved per training worker (default: planned so Ray Data keeps one CPU)"
    )
    resource_wait_s: float = option(
        600.0,
        "on a connected cluster short of GPUs/CPUs: seconds to wait for its autoscaler "
        "to add nodes (0: fail at once); a local Ray never waits",
    )

    def _check(self) -> None:
        _positive(self.num_ray_workers, "--num_ray_workers")
        _at_least_zero(self.max_failures, "--max_failures")
        _positive(self.num_to_keep, "--num_to_keep")
        if self.cpus_per_worker is not None:
            _positive(self.cpus_per_worker, "--cpus_per_worker")
        _at_least_zero(self.resource_wait_s, "--resource_wait_s")
