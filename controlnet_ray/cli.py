"""The original script's command line, mapped onto :class:`TrainConfig`.

Accepts every flag of ``train_image_controlnet.py`` with the same defaults and meaning, the
dash-less ``key value`` form its docs also show (``data_dir train/datas/file epochs 100``),
and adds Ray and data options under their own groups. Importing this module must stay cheap
(no torch, no ray): invalid values have to fail in well under two seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from controlnet_ray.config import (
    BEST_METRICS,
    ENCODERS,
    FRAMINGS,
    GENERATORS,
    IRESNET_DEPTHS,
    LOSS_TYPES,
    PAIR_MODES,
    PROGRESS_MODES,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RayOptions,
    TrainConfig,
)

# flag -> (config section, field); the order is the original's.
_FIELD_OF: dict[str, tuple[str, str]] = {}


def _add(group: argparse._ArgumentGroup, section: str, name: str, **kwargs) -> None:
    group.add_argument(f"--{name}", dest=name, **kwargs)
    _FIELD_OF[name] = (section, name)


def _flag(group: argparse._ArgumentGroup, section: str, name: str, help: str) -> None:
    group.add_argument(f"--{name}", dest=name, action="store_true", default=False, help=help)
    _FIELD_OF[name] = (section, name)


def build_parser(prog: str = "python -m controlnet_ray.train") -> argparse.ArgumentParser:
    """Parser with the original flags first, then the additions, each in its own group."""
    d, m, o, out, r = DataConfig(), ModelConfig(), OptimConfig(), OutputConfig(), RayOptions()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train ImageControlNet with Ray Train. Without --data_dir it trains on the "
        "embedded synthetic multi-view face dataset. Flags may also be given without dashes "
        "as 'key value' pairs, as in the original script's docs.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("original script: data")
    _add(
        g,
        "data",
        "data_dir",
        default=d.data_dir,
        help="folder with front/video metadata JSON "
        "and keypoint .npy (the original layout); absent: embedded synthetic dataset",
    )
    _add(
        g,
        "data",
        "image_dir",
        default=d.image_dir,
        help="root the metadata's relative image "
        "paths hang from (default: the ancestor of data_dir that contains train/)",
    )
    _add(g, "data", "batch_size", type=int, default=d.batch_size, help="per-worker batch size")
    _add(
        g,
        "data",
        "num_workers",
        type=int,
        default=d.num_workers,
        help="data-loading parallelism (shard preparation processes, decode concurrency)",
    )
    _add(g, "data", "image_size", type=int, default=d.image_size, help="aligned crop size")
    g = p.add_argument_group("original script: model")
    _add(g, "model", "feature_dim", type=int, default=m.feature_dim, help="global code width")
    _add(g, "model", "pose_dim", type=int, default=m.pose_dim, help="pose dims (yaw,pitch,roll)")
    _add(
        g,
        "model",
        "num_control_layers",
        type=int,
        default=m.num_control_layers,
        help="control injections into the generator",
    )
    _flag(g, "model", "freeze_generator", "train only the encoder, control branch and pose head")
    g = p.add_argument_group("original script: training")
    _add(g, "optim", "epochs", type=int, default=o.epochs)
    _add(g, "optim", "lr", type=float, default=o.lr)
    _add(g, "optim", "weight_decay", type=float, default=o.weight_decay)
    _add(g, "optim", "pose_loss_weight", type=float, default=o.pose_loss_weight)
    _add(g, "optim", "loss_type", default=o.loss_type, help=f"one of {{{','.join(LOSS_TYPES)}}}")
    _flag(g, "optim", "use_amp", "mixed precision: bf16 autocast, or fp16+GradScaler on old GPUs")
    _add(g, "optim", "gradient_accumulation_steps", type=int, default=o.gradient_accumulation_steps)
    _add(g, "output", "resume", default=out.resume, help="a .pth file to resume from")
    _add(g, "output", "save_dir", default=out.save_dir)
    _add(g, "output", "log_dir", default=out.log_dir, help="TensorBoard log folder")
    _add(
        g,
        "output",
        "save_interval",
        type=int,
        default=out.save_interval,
        help="epochs between checkpoint_epoch_N.pth files",
    )
    _add_additions(p, d, m, o, out, r)
    return p


def _add_additions(
    p, d: DataConfig, m: ModelConfig, o: OptimConfig, out: OutputConfig, r: RayOptions
) -> None:
    g = p.add_argument_group("data (additions)")
    _add(g, "data", "pair_mode", default=d.pair_mode, help=f"one of {{{','.join(PAIR_MODES)}}}")
    _add(g, "data", "min_pose_distance", type=float, default=d.min_pose_distance)
    _add(g, "data", "max_pose_distance", type=float, default=d.max_pose_distance)
    _add(
        g,
        "data",
        "split_ratios",
        type=float,
        nargs=3,
        default=list(d.split_ratios),
        metavar=("TRAIN", "VAL", "TEST"),
    )
    _flag(g, "data", "skip_bad_images", "skip unreadable images (counted) instead of failing")
    _add(
        g,
        "data",
        "framing",
        default=d.framing,
        help=f"crop framing, one of {{{','.join(FRAMINGS)}}}: head = the fitted 3D head at the "
        "same place and size at every pose; arcface = 5-point ArcFace alignment",
    )
    _add(
        g,
        "data",
        "cache_dir",
        default=d.cache_dir,
        help="cache for shards and the synthetic set (default ~/.cache/controlnet_ray)",
    )
    _add(
        g,
        "data",
        "synthetic_identities",
        type=int,
        default=d.synthetic_identities,
        help="embedded dataset: number of identities",
    )
    _add(
        g,
        "data",
        "synthetic_frames",
        type=int,
        default=d.synthetic_frames,
        help="embedded dataset: video frames per identity",
    )
    _add(g, "data", "synthetic_seed", type=int, default=d.synthetic_seed)
    g = p.add_argument_group("model (additions)")
    _add(
        g,
        "model",
        "encoder",
        default=m.encoder,
        help=f"one of {{{','.join(ENCODERS)}}}; auto: "
        "iresnet when --encoder_weights is given, else the small cnn",
    )
    _add(
        g,
        "model",
        "encoder_weights",
        default=m.encoder_weights,
        help="local ArcFace .onnx/.pth or torchvision ResNet-50 .pth (never downloaded)",
    )
    _add(
        g,
        "model",
        "iresnet_depth",
        type=int,
        default=m.iresnet_depth,
        help=f"one of {{{','.join(str(x) for x in IRESNET_DEPTHS)}}}",
    )
    _flag(g, "model", "freeze_backbone", "freeze the pretrained encoder, BatchNorm stats included")
    _add(g, "model", "base_channels", type=int, default=m.base_channels)
    _add(
        g,
        "model",
        "generator",
        default=m.generator,
        help=f"one of {{{','.join(GENERATORS)}}}: warp = warp the source by a 3D head proxy and "
        "refine (needs --framing head); plain = the seed's U-Net",
    )
    _add(
        g,
        "model",
        "identity_weights",
        default=m.identity_weights,
        help="local ArcFace .onnx/.pth for the identity loss (frozen, never downloaded)",
    )
    g = p.add_argument_group("training (additions)")
    _add(
        g,
        "optim",
        "background_loss_weight",
        type=float,
        default=o.background_loss_weight,
        help="image-loss weight of pixels outside the target's head, in [0, 1]",
    )
    _add(
        g,
        "optim",
        "identity_loss_weight",
        type=float,
        default=o.identity_loss_weight,
        help="weight of the ArcFace identity loss (needs --identity_weights); 0 = off",
    )
    _add(
        g,
        "optim",
        "adversarial_loss_weight",
        type=float,
        default=o.adversarial_loss_weight,
        help="weight of the hinge adversarial loss from a spectral-norm patch discriminator "
        "(trained and checkpointed with the model); 0 = off",
    )
    _add(
        g,
        "optim",
        "disc_lr",
        type=float,
        default=o.disc_lr,
        help="the discriminator's peak Adam learning rate (follows --lr's warm-up and cosine)",
    )
    _add(g, "optim", "grad_clip", type=float, default=o.grad_clip)
    _add(g, "optim", "warmup_epochs", type=int, default=o.warmup_epochs)
    _flag(
        g,
        "output",
        "no_judge",
        "skip the independent judges (held-out pose judge, identity, sharpness, trivial "
        "predictors) in each epoch's line",
    )
    _add(
        g,
        "output",
        "best_metric",
        default=out.best_metric,
        help=f"selects best_model.pth: one of {{{','.join(BEST_METRICS)}}}",
    )
    _add(
        g,
        "output",
        "image_log_interval",
        type=int,
        default=out.image_log_interval,
        help="epochs between Images/* TensorBoard summaries",
    )
    _add(
        g,
        "output",
        "progress",
        choices=PROGRESS_MODES,
        default=out.progress,
        help="console progress: auto draws an in-epoch bar when a terminal is attached, "
        "bar always draws it (on stderr), lines prints only the per-epoch lines",
    )
    g = p.add_argument_group("Ray")
    _add(
        g,
        "ray",
        "num_ray_workers",
        type=int,
        default=r.num_ray_workers,
        help="training workers (DDP ranks)",
    )
    _flag(g, "ray", "use_gpu", "one GPU per worker (a local Ray without GPUs fails fast)")
    _add(
        g,
        "ray",
        "address",
        default=r.address,
        help="Ray cluster address; absent: $RAY_ADDRESS, else a local Ray",
    )
    _add(
        g,
        "ray",
        "run_name",
        default=r.run_name,
        help="Ray run name (default: derived from --save_dir, stable across re-runs)",
    )
    _add(
        g,
        "ray",
        "storage_path",
        default=r.storage_path,
        help="Ray checkpoint storage (local path, NFS, s3://...); default save_dir/ray_results",
    )
    _add(g, "ray", "seed", type=int, default=r.seed)
    _add(
        g,
        "ray",
        "max_failures",
        type=int,
        default=r.max_failures,
        help="worker failures Ray recovers from by restarting from the last checkpoint",
    )
    _add(
        g,
        "ray",
        "num_to_keep",
        type=int,
        default=r.num_to_keep,
        help="Ray checkpoints kept (best by val PSNR, plus the latest)",
    )
    _flag(g, "ray", "fresh", "start over even if a Ray checkpoint of this run exists")
    _add(
        g,
        "ray",
        "cpus_per_worker",
        type=float,
        default=r.cpus_per_worker,
        help="CPUs reserved per training worker (default: planned so Ray Data keeps one CPU)",
    )
    _add(
        g,
        "ray",
        "resource_wait_s",
        type=float,
        default=r.resource_wait_s,
        help="on a connected cluster short of GPUs/CPUs: seconds to wait for its autoscaler "
        "to add nodes (0: fail at once); a local Ray never waits",
    )


def normalize_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Turn the original docs' dash-less ``key value`` pairs into ``--key value``.

    A bare token is rewritten only when it names a known flag exactly; boolean flags may be
    followed by true/false. Anything else is passed through so argparse reports it by name.
    """
    bool_flags = {a.dest for a in parser._actions if isinstance(a, argparse._StoreTrueAction)}
    known = {a.dest for a in parser._actions if a.option_strings} - {"help"}
    out: list[str] = []
    i = 0
    tokens = list(argv)
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("-") and tok in known and (i == 0 or not _expects_value(out, parser)):
            if tok in bool_flags:
                nxt = tokens[i + 1].lower() if i + 1 < len(tokens) else ""
                if nxt in ("true", "1", "yes"):
                    out.append(f"--{tok}")
                    i += 2
                    continue
                if nxt in ("false", "0", "no"):
                    i += 2
                    continue
            out.append(f"--{tok}")
        else:
            out.append(tok)
        i += 1
    return out


def _expects_value(out: list[str], parser: argparse.ArgumentParser) -> bool:
    """True when the previous token is a flag that still wants its value."""
    if not out or not out[-1].startswith("--"):
        return False
    flag = out[-1].split("=", 1)[0]
    for action in parser._actions:
        if flag in action.option_strings:
            return action.nargs != 0 and "=" not in out[-1]
    return False


def namespace_to_config(ns: argparse.Namespace) -> TrainConfig:
    """Build the typed config tree from parsed flags."""
    sections: dict[str, dict] = {"data": {}, "model": {}, "optim": {}, "output": {}, "ray": {}}
    for flag, (section, field) in _FIELD_OF.items():
        if hasattr(ns, flag):
            sections[section][field] = getattr(ns, flag)
    sections["data"]["split_ratios"] = tuple(sections["data"]["split_ratios"])
    sections["model"]["image_size"] = sections["data"]["image_size"]
    return TrainConfig.from_dict(sections)


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse and validate; exits with status 2 and a message naming the flag on bad input."""
    parser = build_parser()
    args = normalize_argv(sys.argv[1:] if argv is None else argv, parser)
    ns = parser.parse_args(args)
    try:
        return namespace_to_config(ns).validate()
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
