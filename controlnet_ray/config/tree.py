"""The whole run's config, :class:`TrainConfig`: one section per concern, the rules that span
sections, the checks of the paths a run reads, and the (de)serialisation checkpoints and Ray
workers use (a stored config is a plain dict; fields it lacks take their old behaviour)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlnet_ray.config.checks import ConfigError, _Section
from controlnet_ray.config.sections import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RayOptions,
)


@dataclass
class TrainConfig:
    """The whole run: one section per concern, checked together at construction."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayOptions = field(default_factory=RayOptions)

    def __post_init__(self) -> None:
        _check_together(self)

    def validate(self) -> TrainConfig:
        """Every check, for a config about to run: the sections' values again (they may have
        been changed since construction), the cross-section rules, then the paths it reads.
        Raise ConfigError naming the flag for the first problem; return self."""
        for section in sections(self).values():
            section.check()
        _check_together(self)
        _check_paths(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; unknown keys (from newer versions) are rejected by name, and
        fields missing from an older dict take their old behaviour (``_LEGACY_DEFAULTS``)."""
        parts = {}
        for name, sub_cls in section_classes().items():
            values = dict(d.get(name, {}))
            unknown = set(values) - {f.name for f in dataclasses.fields(sub_cls)}
            if unknown:
                raise ConfigError(f"unknown config keys in section {name!r}: {sorted(unknown)}")
            if "split_ratios" in values:
                values["split_ratios"] = tuple(values["split_ratios"])
            parts[name] = sub_cls(**{**_LEGACY_DEFAULTS.get(name, {}), **values})
        return cls(**parts)

    def run_name(self) -> str:
        """The Ray run's name: ``--save_dir`` and the settings that define the training.

        The same command again (or a longer ``--epochs``) gets the same name, so it continues
        its Ray run; a command whose settings differ is another run of the same ``--save_dir``
        (``controlnet_<folder>_<folder digest>_<settings digest>``), on any storage."""
        if self.ray.run_name:
            return self.ray.run_name
        resolved = str(Path(self.output.save_dir).expanduser().resolve())
        digest = hashlib.sha1(resolved.encode("utf-8")).hexdigest()[:8]
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(resolved).name)
        return f"controlnet_{stem or 'run'}_{digest}_{self.settings_digest()}"

    def defining_settings(self) -> dict[str, dict[str, Any]]:
        """The settings that make a training run what it is: every field but those a re-run
        may change (:data:`RERUN_FREE_FIELDS`), ``--epochs`` (a longer run continues) and the
        run's place (``--save_dir``, ``--run_name``, ``--storage_path``)."""
        skip = RERUN_FREE_FIELDS | RUN_PLACE_FIELDS | {("optim", "epochs")}
        return {
            section: {k: v for k, v in values.items() if (section, k) not in skip}
            for section, values in self.to_dict().items()
        }

    def settings_digest(self) -> str:
        """Short digest of :meth:`defining_settings` (paths as given: resolve them first)."""
        text = json.dumps(self.defining_settings(), sort_keys=True, default=str)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]

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


def section_classes() -> dict[str, type[_Section]]:
    """Section name -> its dataclass, in TrainConfig's order."""
    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


def sections(cfg: TrainConfig) -> dict[str, _Section]:
    """Section name -> the section object of ``cfg``."""
    return {name: getattr(cfg, name) for name in section_classes()}


#: Settings a re-run of the same run may change: they do not change what is computed (console,
#: file cadence, data-loading parallelism, placement, retry budget, compiling).
RERUN_FREE_FIELDS = frozenset(
    {
        ("data", "num_workers"),
        ("data", "cache_dir"),
        ("optim", "compile"),
        ("output", "log_dir"),
        ("output", "save_interval"),
        ("output", "image_log_interval"),
        ("output", "progress"),
        ("ray", "address"),
        ("ray", "max_failures"),
        ("ray", "num_to_keep"),
        ("ray", "fresh"),
        ("ray", "cpus_per_worker"),
        ("ray", "resource_wait_s"),
    }
)
#: Where a run is, not what it computes.
RUN_PLACE_FIELDS = frozenset({("output", "save_dir"), ("ray", "run_name"), ("ray", "storage_path")})


#: Values of fields added after checkpoints were first written, for configs that lack them:
#: a stored config describes what that run did, so a missing field means the old behaviour.
_LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"framing": "arcface"},
    "model": {
        "generator": "plain",
        "fill_seed": "head_colour",
        "seen_side": "clamp",
        "head_shape": "fixed",
        "head_proxy": "skull",
    },
    "optim": {"background_loss_weight": 1.0},
}


def _check_together(cfg: TrainConfig) -> None:
    """The rules that span sections (pure: no file system)."""
    d, m, o = cfg.data, cfg.model, cfg.optim
    if m.image_size != d.image_size:
        raise ConfigError(
            f"--image_size: the model's input size {m.image_size} differs from the data's crop "
            f"size {d.image_size} (TrainConfig.model.image_size must equal data.image_size)"
        )
    if m.generator == "warp" and d.framing != "head":
        raise ConfigError(
            "--generator warp needs --framing head (its 3D proxy assumes head-centred crops); "
            "use --generator plain with --framing arcface"
        )
    if o.identity_loss_weight > 0 and m.identity_weights is None:
        raise ConfigError(
            f"--identity_loss_weight {o.identity_loss_weight} needs --identity_weights "
            "(a local ArcFace .onnx or .pth; nothing is downloaded)"
        )


def _check_paths(cfg: TrainConfig) -> None:
    """The files and folders a run reads must exist (checked on the machine that starts it,
    not when a stored config is loaded elsewhere)."""
    for flag, path, kind in (
        ("--data_dir", cfg.data.data_dir, "dir"),
        ("--image_dir", cfg.data.image_dir, "dir"),
        ("--encoder_weights", cfg.model.encoder_weights, "file"),
        ("--identity_weights", cfg.model.identity_weights, "file"),
        ("--resume", cfg.output.resume, "file"),
    ):
        if path is None:
            continue
        if kind == "dir" and not Path(path).is_dir():
            raise ConfigError(f"{flag} does not exist or is not a directory: {path}")
        if kind == "file" and not Path(path).is_file():
            what = "checkpoint" if flag == "--resume" else "file"
            raise ConfigError(f"{flag} {what} not found: {path}")
