"""The choice lists of the config: each a ``Literal`` type (what fields are annotated with and
what the CLI lists and the sections check), and the tuple read from it for code that needs the
values. One list each: the tuple is never written out by hand."""

from __future__ import annotations

from typing import Literal, get_args

LossType = Literal["mse", "l1", "combined"]
EncoderName = Literal["auto", "iresnet", "resnet50", "cnn"]
IResNetDepth = Literal[18, 34, 50, 100]
PairMode = Literal["front_to_video", "any"]
Framing = Literal["head", "arcface"]
GeneratorName = Literal["warp", "plain"]
FillSeed = Literal["copy", "latitude", "head_colour"]
HeadShape = Literal["learned", "fixed"]
SeenSide = Literal["spread", "clamp"]
HeadProxy = Literal["skull_jaw", "skull"]
BestMetric = Literal["val_psnr_face", "val_psnr", "val_loss"]
ProgressMode = Literal["auto", "bar", "lines"]
Device = Literal["cpu", "cuda", "auto"]  # --device of the inference CLIs and benchmarks

LOSS_TYPES: tuple[str, ...] = get_args(LossType)
ENCODERS: tuple[str, ...] = get_args(EncoderName)
IRESNET_DEPTHS: tuple[int, ...] = get_args(IResNetDepth)
PAIR_MODES: tuple[str, ...] = get_args(PairMode)
FRAMINGS: tuple[str, ...] = get_args(Framing)
GENERATORS: tuple[str, ...] = get_args(GeneratorName)
FILL_SEEDS: tuple[str, ...] = get_args(FillSeed)
HEAD_SHAPES: tuple[str, ...] = get_args(HeadShape)
SEEN_SIDES: tuple[str, ...] = get_args(SeenSide)
HEAD_PROXIES: tuple[str, ...] = get_args(HeadProxy)
BEST_METRICS: tuple[str, ...] = get_args(BestMetric)
PROGRESS_MODES: tuple[str, ...] = get_args(ProgressMode)
DEVICE_CHOICES: tuple[str, ...] = get_args(Device)
