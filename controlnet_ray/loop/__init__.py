"""One worker's training run, without Ray: build the components, then run the epochs.

Why a package of its own: the loop (steps, epoch sums, the validation reduce, the best model,
TensorBoard, the original's files, the report) is the product, and it must run in a test
process. Everything it needs from Ray Train (this worker's rank and device, DDP preparation,
the dataset shards, the starting checkpoint, ``report``) comes through a :class:`WorkerHost`:
:class:`controlnet_ray.worker.RayHost` in production, an in-process host in
``tests/test_loop.py``. Collectives go through ``torch.distributed`` (no-ops without a
process group), so one process is a world of one.

Setup reads top to bottom in :func:`run_worker`: seeds, rank 0's outputs, the components
(:func:`build_trainee`: model, starting checkpoint through the one resume path, optimizer,
scheduler, adversary, engine), the judges, then :class:`TrainingLoop`.

Modules: ``host`` (:class:`WorkerHost`, :class:`WorkerSetup`, :class:`EpochCheckpoint`),
``setup`` (:func:`run_worker`, :func:`build_trainee`), ``collectives`` (rank 0's objects to
every rank, every rank's RNG streams, sums), ``epochs`` (:class:`TrainingLoop`: the training
pass, summaries, checkpoint and report), ``validation`` (the validation reduce and the judged
figures), ``epoch_metrics`` (what each epoch reports, the finite guard). The best model is
tracked by ``checkpoint.RunState.record_epoch``, the files named by ``run_files``. The names
below are re-exported so ``controlnet_ray.loop.<name>`` keeps working.

Nothing here imports ray.
"""

from controlnet_ray.loop.collectives import all_rng_states, from_rank_zero
from controlnet_ray.loop.epoch_metrics import _require_finite, epoch_metrics
from controlnet_ray.loop.epochs import STEP_LOG_EVERY, TrainingLoop
from controlnet_ray.loop.host import SCRATCH_ROOT, EpochCheckpoint, WorkerHost, WorkerSetup
from controlnet_ray.loop.setup import (
    Trainee,
    batches_per_rank,
    build_trainee,
    open_outputs,
    run_worker,
)
from controlnet_ray.loop.validation import (
    JUDGED_KEYS,
    JUDGED_MAX_PAIRS,
    build_judging,
    judge,
    judged_metrics,
    validate,
)

__all__ = [
    "JUDGED_KEYS",
    "JUDGED_MAX_PAIRS",
    "SCRATCH_ROOT",
    "STEP_LOG_EVERY",
    "EpochCheckpoint",
    "Trainee",
    "TrainingLoop",
    "WorkerHost",
    "WorkerSetup",
    "_require_finite",
    "all_rng_states",
    "batches_per_rank",
    "build_judging",
    "build_trainee",
    "epoch_metrics",
    "from_rank_zero",
    "judge",
    "judged_metrics",
    "open_outputs",
    "run_worker",
    "validate",
]
