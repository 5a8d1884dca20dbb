"""Checkpoint files in ``--save_dir``, shaped as the original script leaves them (named in
:mod:`controlnet_ray.run_files`).

Users of the original script load ``checkpoint_epoch_{N}.pth``, ``best_model.pth`` and
``final_model.pth`` with plain ``torch.load`` and read ``model_state_dict``, ``epoch``, ``args``
and friends, so those keys keep their names and meaning.  On top of them each file carries what an
*exact* resume needs (scaler, RNG streams, full config, model signature, trainable set).

Everything stored is safe for ``torch.load(weights_only=True)`` (tensors, numbers, strings,
containers) so files can be opened without trusting their source and by torch >= 2.6's default.
Writes are atomic: a crash mid-save leaves the previous file intact, never a truncated one.

Nothing here imports ray: the pure-PyTorch path uses this package too.

Modules: ``format`` (keys, versions, :class:`CheckpointError`), ``contents`` (the dict saved,
its digest, the finite check, the one DDP unwrap), ``loading`` (``load_checkpoint``),
``compatibility`` (does a file fit this model), ``resume`` (the one resume path: planning,
:class:`RunState`, restoring), ``rerun`` (a re-run's flag changes), ``rng`` (RNG streams).
The names below are the ones imported as ``controlnet_ray.checkpoint.<name>`` elsewhere.
"""

from controlnet_ray.checkpoint.compatibility import check_model_compat
from controlnet_ray.checkpoint.contents import (
    build_checkpoint,
    legacy_args,
    trainable_names,
    unwrap_model,
)
from controlnet_ray.checkpoint.format import (
    CONTENT_DIGEST_KEY,
    DISC_KEY,
    DISC_OPTIMIZER_KEY,
    FORMAT_VERSION,
    FRESH_START_EPOCH,
    LEGACY_FORMAT_VERSION,
    LEGACY_KEYS,
    POSE_ESTIMATE_KEY,
    CheckpointError,
)
from controlnet_ray.checkpoint.loading import load_checkpoint
from controlnet_ray.checkpoint.rerun import format_setting, plan_rerun, setting_changes
from controlnet_ray.checkpoint.resume import (
    ResumePlan,
    RunState,
    StartingPoint,
    plan_resume,
    restore_discriminator,
    restore_training_state,
    restore_weights,
)
from controlnet_ray.checkpoint.rng import (
    capture_rng_state,
    restore_rng_state,
    rng_state_for_rank,
    seed_rank_streams,
)

__all__ = [
    "CONTENT_DIGEST_KEY",
    "DISC_KEY",
    "POSE_ESTIMATE_KEY",
    "DISC_OPTIMIZER_KEY",
    "FORMAT_VERSION",
    "FRESH_START_EPOCH",
    "LEGACY_FORMAT_VERSION",
    "LEGACY_KEYS",
    "CheckpointError",
    "ResumePlan",
    "RunState",
    "StartingPoint",
    "build_checkpoint",
    "capture_rng_state",
    "check_model_compat",
    "legacy_args",
    "load_checkpoint",
    "format_setting",
    "plan_rerun",
    "setting_changes",
    "plan_resume",
    "restore_discriminator",
    "restore_rng_state",
    "restore_training_state",
    "restore_weights",
    "rng_state_for_rank",
    "seed_rank_streams",
    "trainable_names",
    "unwrap_model",
]
