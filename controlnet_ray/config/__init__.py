"""Typed configuration tree for controlnet-ray, and the one description of the command line.

One dataclass per concern (data, model, optimisation, output, Ray). Each field carries its
flag's help text in its metadata (:func:`option`), so :mod:`controlnet_ray.cli` generates the
parser from these classes and nothing repeats a default, a type or a choice list. Choice lists
are ``Literal`` types; the tuples below are read from them. Everything else in the package reads
only these objects, never ``argparse.Namespace`` or globals.

Validation: each section checks its own values in ``__post_init__`` (choices, ranges, finite
floats; the message names the flag), and :class:`TrainConfig` checks the few rules that span
sections. Both are pure, so a config loaded from a checkpoint or a Tune trial is checked the same
way without touching the file system; :meth:`TrainConfig.validate` adds the checks of the paths a
run reads and repeats the value checks for objects changed after construction. All of it runs
before Ray (or any heavy import) starts.

Modules: ``choices`` (the ``Literal`` choice lists and their tuples), ``options`` (a field's
flag description: :func:`option`, :func:`flag_name`, :func:`choices_of`), ``checks``
(:class:`ConfigError`, the range checks, the sections' base class), ``sections`` (the five
section dataclasses), ``tree`` (:class:`TrainConfig`, the cross-section and path checks, the
legacy defaults of stored configs). Every name is re-exported here, so
``from controlnet_ray.config import X`` is the import to use. Stored configs are plain dicts
(``TrainConfig.to_dict``), never pickled classes, so checkpoints do not depend on these paths.
"""

from controlnet_ray.config.checks import ConfigError
from controlnet_ray.config.choices import (
    BEST_METRICS,
    DEVICE_CHOICES,
    ENCODERS,
    FILL_SEEDS,
    FRAMINGS,
    GENERATORS,
    HEAD_PROXIES,
    HEAD_SHAPES,
    IRESNET_DEPTHS,
    LOSS_TYPES,
    PAIR_MODES,
    PROGRESS_MODES,
    SEEN_SIDES,
    BestMetric,
    Device,
    EncoderName,
    FillSeed,
    Framing,
    GeneratorName,
    HeadShape,
    IResNetDepth,
    LossType,
    PairMode,
    ProgressMode,
    SeenSide,
)
from controlnet_ray.config.options import choices_of, field_types, flag_name, option
from controlnet_ray.config.sections import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    RayOptions,
)
from controlnet_ray.config.tree import (
    RERUN_FREE_FIELDS,
    TrainConfig,
    section_classes,
    sections,
)

__all__ = [
    "BEST_METRICS",
    "DEVICE_CHOICES",
    "ENCODERS",
    "FILL_SEEDS",
    "FRAMINGS",
    "GENERATORS",
    "HEAD_PROXIES",
    "HEAD_SHAPES",
    "IRESNET_DEPTHS",
    "LOSS_TYPES",
    "PAIR_MODES",
    "PROGRESS_MODES",
    "RERUN_FREE_FIELDS",
    "SEEN_SIDES",
    "BestMetric",
    "ConfigError",
    "DataConfig",
    "Device",
    "EncoderName",
    "FillSeed",
    "Framing",
    "GeneratorName",
    "HeadShape",
    "IResNetDepth",
    "LossType",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "PairMode",
    "ProgressMode",
    "RayOptions",
    "SeenSide",
    "TrainConfig",
    "choices_of",
    "field_types",
    "flag_name",
    "option",
    "section_classes",
    "sections",
]
