"""Everything a run can check before Ray starts: paths made absolute (Ray workers run
elsewhere), output folders writable, ``--resume`` fitting the model, a re-run agreeing with its
Ray run, the data readable and (locally, or when cached) prepared; and the errors these checks
raise for bad input.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from controlnet_ray.config import ConfigError, TrainConfig
from controlnet_ray.launcher.connection import check_train_v2
from controlnet_ray.launcher.data import RunData, locate_data, prepare_data, unprepared
from controlnet_ray.launcher.rerun import check_rerun


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors our own checks raise for bad input (flags, data, checkpoints, weights)."""
    from controlnet_ray.checkpoint import CheckpointError
    from controlnet_ray.data.layout import DataError
    from controlnet_ray.model.iresnet import WeightsError

    return (ConfigError, DataError, CheckpointError, WeightsError)


EXPECTED_ERRORS = _expected_errors()


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Resolve every relative path against the driver's cwd: Ray workers run elsewhere."""
    import dataclasses

    def resolve(p: str | None) -> str | None:
        return None if p is None or "://" in p else str(Path(p).expanduser().resolve())

    out = dataclasses.replace(
        cfg.output,
        save_dir=resolve(cfg.output.save_dir),
        log_dir=resolve(cfg.output.log_dir),
        resume=resolve(cfg.output.resume),
    )
    data = dataclasses.replace(
        cfg.data,
        data_dir=resolve(cfg.data.data_dir),
        image_dir=resolve(cfg.data.image_dir),
        cache_dir=str(cfg.data.resolved_cache_dir()),
    )
    model = dataclasses.replace(
        cfg.model,
        encoder_weights=resolve(cfg.model.encoder_weights),
        identity_weights=resolve(cfg.model.identity_weights),
    )
    resolved = dataclasses.replace(cfg, output=out, data=data, model=model)
    # The run's name is taken from the resolved paths: the same command from another working
    # folder, with the same files, is the same run.
    ray_opts = dataclasses.replace(
        cfg.ray, storage_path=resolved.storage_path(), run_name=resolved.run_name()
    )
    return dataclasses.replace(resolved, ray=ray_opts)


def check_resume_file(cfg: TrainConfig) -> None:
    """--resume must fit the model this run builds: say why not before Ray starts."""
    if not cfg.output.resume:
        return
    from controlnet_ray import checkpoint as ckpt
    from controlnet_ray.model import build_model, model_signature

    try:
        state = ckpt.load_checkpoint(cfg.output.resume)
        ckpt.check_model_compat(state, build_model(cfg.model), model_signature(cfg.model))
    except ckpt.CheckpointError as exc:
        raise ConfigError(f"--resume: {exc}") from exc


def output_dirs(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(flag, folder) of everything a run writes locally; URIs (s3://...) are Ray's business."""
    dirs = [
        ("--save_dir", cfg.output.save_dir),
        ("--log_dir", cfg.output.log_dir),
        ("--cache_dir", str(cfg.data.resolved_cache_dir())),
        ("--storage_path", cfg.storage_path()),
    ]
    return [(flag, d) for flag, d in dirs if "://" not in d]


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> None:
    """Create ``path`` if needed and write a probe file in it; ConfigError naming ``flag``.

    A real write, not ``os.access``: that answers yes to root on a read-only mount, and the
    failure would otherwise surface inside a Ray actor, once per retry.
    """
    p = Path(path)
    blocker = next((a for a in (p, *p.parents) if a.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "" if blocker == p else f" ({blocker} is a file)"
        raise ConfigError(f"{flag} {path} is not a folder{where}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p, prefix=".write_probe_"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path} is not writable: {exc.strerror or exc}") from exc


def check_before_ray(cfg: TrainConfig, *, defer_preparation: bool = False) -> RunData:
    """Everything that can be known before Ray starts: Ray Train v2 not switched off, output
    folders writable, --resume fits, a re-run agrees with its Ray run, and the data
    (:func:`check_data`)."""
    check_train_v2()
    check_outputs(cfg)
    check_rerun(cfg)
    return check_data(cfg, defer_preparation=defer_preparation)


def check_outputs(cfg: TrainConfig) -> None:
    """Every local output folder writable and --resume fitting the model (a sweep checks
    these too; its trials' re-runs are Ray Tune's business)."""
    for flag, folder in output_dirs(cfg):
        check_writable_dir(folder, flag)
    check_resume_file(cfg)


def check_data(cfg: TrainConfig, *, defer_preparation: bool = False) -> RunData:
    """The data read and checked (its JSON, npy and image paths) and, unless
    ``defer_preparation``, prepared with its judges trained.

    ``defer_preparation`` (a run joining an existing cluster): shards not cached yet are left
    to :func:`~controlnet_ray.launcher.data.prepare_data` once connected, so decoding, pose
    fitting, aligning and the judges' training run as Ray tasks on the cluster's nodes, not
    on the driver's (a head with ``num-cpus: 0``)."""
    source = locate_data(cfg)
    if defer_preparation and (waiting := unprepared(cfg, source)):
        print(f"{waiting} once connected to the cluster, as Ray tasks on its nodes", flush=True)
        return RunData(source, None)
    return RunData(source, prepare_data(cfg, source))
