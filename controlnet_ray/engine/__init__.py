"""The training step and evaluation loop, pure PyTorch.

This package must never import Ray: a GPU smoke check drives it on a bare machine, and the
Ray worker loop only wraps it (data in, metrics and state out).  It is DDP-aware without
depending on a process group: ``no_sync`` is used when the model has it, and the
skip-on-non-finite decision is all-reduced only when ``torch.distributed`` is initialised.

Loss definitions (``total = image + pose_loss_weight * pose + identity_loss_weight * identity``)
live here so training and evaluation can never disagree on them.  The adversarial option adds
``adversarial_loss_weight * hinge_generator_loss`` to what the generator minimises in training
only (evaluation has no discriminator), so ``total`` and the reported ``loss`` stay comparable
between training, validation and runs without the option.

Modules: ``device`` (``--device``), ``amp`` (mixed precision), ``optimizer`` (AdamW, LR
schedule), ``batch`` (the batch's keys, its move to the device, the model call), ``losses``
(image, pose, identity; their total), ``adversarial`` (hinge losses, :class:`Adversary`),
``training`` (:class:`TrainEngine`), ``evaluation`` (:func:`evaluate`, :class:`EvalSums`).
The names below are the ones imported as ``controlnet_ray.engine.<name>`` elsewhere.
"""

from controlnet_ray.engine.adversarial import (
    Adversary,
    build_disc_optimizer,
    hinge_disc_loss,
    hinge_gen_loss,
    patch_weights,
)
from controlnet_ray.engine.amp import AmpSettings, resolve_amp
from controlnet_ray.engine.batch import move_batch
from controlnet_ray.engine.device import DeviceError, resolve_device
from controlnet_ray.engine.evaluation import EvalSums, evaluate
from controlnet_ray.engine.losses import (
    MissingIdentityEncoderError,
    compute_losses,
    image_loss,
    pose_scale_deg,
)
from controlnet_ray.engine.optimizer import (
    build_optimizer,
    build_scheduler,
    cap_peak_lr,
    lr_factor,
    use_fused,
)
from controlnet_ray.engine.training import NonFiniteLossError, StepMetrics, TrainEngine

__all__ = [
    "Adversary",
    "AmpSettings",
    "DeviceError",
    "EvalSums",
    "MissingIdentityEncoderError",
    "NonFiniteLossError",
    "StepMetrics",
    "TrainEngine",
    "build_disc_optimizer",
    "build_optimizer",
    "cap_peak_lr",
    "build_scheduler",
    "compute_losses",
    "evaluate",
    "hinge_disc_loss",
    "hinge_gen_loss",
    "image_loss",
    "lr_factor",
    "move_batch",
    "patch_weights",
    "use_fused",
    "pose_scale_deg",
    "resolve_amp",
    "resolve_device",
]
