"""The pose judge: a small CNN that reads (yaw, pitch, roll) off a crop, never a training loss.

Why a separate network: the model's own pose head learns alongside the generator and scores the
generator's outputs, so the two can agree on anything. The judge is trained only on *real* crops
of *training* persons with their estimated poses, then frozen and saved; every predictor's
outputs (model, trivial baselines) are read by the same frozen weights, and its error on real
held-out targets is the floor no generator can beat.

Design choices, each for a reason:

* 64-px input (area-downsampled): pose is a coarse property; 64 px trains in well under a
  minute of CPU on ~600 crops.
* GroupNorm, no BatchNorm: a judge's reading of one image must not depend on the batch it
  happens to be scored in.
* Per-image standardisation of the input (zero mean, unit variance over all pixels): the judge
  reads geometry, not exposure, so a predictor is not scored on its colour cast.
* Augmentation: mirror (image flipped, yaw and roll negated; pitch is unchanged by a left-right
  mirror), small random shifts and scale (the crop's framing is not the judge's business),
  per-channel gain/offset jitter, and mild blur on some images (generated faces are softer than
  real ones; the judge should still read their pose).
* Deterministic given the seed: one ``torch.Generator`` drives initialisation, order and
  augmentation.
* A step cap (``max_steps``, both judges): epochs over the training crops, but at most
  ``JUDGE_MAX_STEPS`` steps of 32 crops. Judge training runs before the model's and a step
  costs the same whatever the data's size, so on a small set the epochs decide (the embedded
  40-identity set: 540 and 720 steps, under the cap) and on a large one the cap does: a fixed
  few CPU-minutes (README, "Console output") where the model's epochs grow with the data. The
  cap is in the settings and so in the judges' cache key.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from controlnet_ray.files import atomic_save

JUDGE_VERSION = 1
JUDGE_MAX_STEPS = 1000  # steps of either judge at most (see the module docstring)
POSE_SCALE_DEG = 45.0  # targets are regressed in units of 45 degrees
_MIRROR = torch.tensor([-1.0, 1.0, -1.0])  # (yaw, pitch, roll) under a horizontal flip


@dataclass(frozen=True)
class JudgeSettings:
    """Everything that changes the trained judge (part of its cache key)."""

    input_size: int = 64
    width: int = 16
    epochs: int = 30
    max_steps: int = JUDGE_MAX_STEPS
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: float = 0.06  # fraction of the crop
    max_scale: float = 0.06
    blur_prob: float = 0.3
    seed: int = 0

    def key(self) -> str:
        """Short hash of the settings and the judge version."""
        doc = json.dumps({"version": JUDGE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:12]


def _stage(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
    )


class PoseJudgeNet(nn.Module):
    """Four stride-2 stages (64 -> 4 px), then an MLP on the flattened 4x4 map (pose is
    where things are, so the spatial layout is kept rather than pooled away)."""

    def __init__(self, input_size: int = 64, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.features = nn.Sequential(
            *(_stage(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True))
        )
        side = input_size // 16
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(chans[-1] * side * side, 128), nn.SiLU(), nn.Linear(128, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per image over all channels and pixels."""
    flat = x.flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1).clamp(min=1e-3).view(-1, 1, 1, 1)
    return (x - mean) / std


def resize_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, size, size]`` in ``[-1, 1]`` (area filter)."""
    small = [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images]
    x = torch.from_numpy(np.stack(small)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def resize_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    """float ``[N, 3, H, W]`` in ``[-1, 1]`` -> ``[N, 3, size, size]`` (area filter, clamped)."""
    x = images.detach().float().clamp(-1.0, 1.0)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="area")


class FrozenJudge:
    """A frozen judge network (no gradients, eval mode) applied in batches at its input size;
    the pose and identity judges differ only in what they make of the network's output."""

    def __init__(self, net: nn.Module, settings: Any, info: dict | None = None):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.settings = settings
        self.info = dict(info or {})

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        """The judge's reading of one resized batch on its device."""
        raise NotImplementedError

    @torch.no_grad()
    def _batched(self, images: torch.Tensor, width: int, batch_size: int) -> torch.Tensor:
        """``_read`` of ``[N, 3, H, W]`` images in ``[-1, 1]`` as ``[N, width]`` CPU float32."""
        device = next(self.net.parameters()).device
        out = []
        for i in range(0, len(images), batch_size):
            x = resize_tensor(images[i : i + batch_size], self.settings.input_size).to(device)
            out.append(self._read(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, width)


class PoseJudge(FrozenJudge):
    """A frozen pose judge: ``judge(images) -> [N, 3]`` degrees (yaw, pitch, roll)."""

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(standardise(x)) * POSE_SCALE_DEG

    def __call__(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Poses in degrees ``[N, 3]`` (CPU float32) of ``[N, 3, H, W]`` images in ``[-1, 1]``."""
        return self._batched(images, 3, batch_size)

    def to(self, device: torch.device | str) -> PoseJudge:
        self.net.to(device)
        return self

    def save(self, path: str | Path) -> None:
        """Atomic write of weights, settings and info (loadable with ``weights_only=True``)."""
        save_net(path, self.net, JUDGE_VERSION, asdict(self.settings), self.info)

    @classmethod
    def load(cls, path: str | Path) -> PoseJudge:
        """A judge saved by :meth:`save`."""
        state, doc = load_net(path, JUDGE_VERSION, "pose judge")
        settings = JudgeSettings(**doc["settings"])
        net = PoseJudgeNet(settings.input_size, settings.width)
        net.load_state_dict(state)
        return cls(net, settings, doc.get("info"))


def save_net(path: str | Path, net: nn.Module, version: int, settings: dict, info: dict) -> None:
    """Atomic write of a judge's weights with its version, settings and info."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    doc = {"version": version, "settings": settings, "info": info}
    atomic_save({"state_dict": state, "meta": json.dumps(doc)}, path)


def load_net(path: str | Path, version: int, what: str) -> tuple[dict, dict]:
    """(weights, meta document) written by :func:`save_net`; ValueError on another version."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    doc = json.loads(blob["meta"])
    if doc.get("version") != version:
        raise ValueError(f"{path}: {what} version {doc.get('version')} != {version}")
    return blob["state_dict"], doc


# ----------------------------------------------------------------------------- training


def mirror(images: torch.Tensor, poses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal flip of ``[N, 3, H, W]`` images with yaw and roll negated (pitch kept)."""
    return images.flip(-1), poses * _MIRROR.to(poses)


def augment(
    x: torch.Tensor, y: torch.Tensor | None, s: JudgeSettings, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random mirror, shift/scale, colour jitter and blur of one batch (``g`` drives all);
    poses ``y`` (when given) follow the mirror.  ``s`` needs ``max_shift``, ``max_scale`` and
    ``blur_prob`` (the identity judge's settings have them too)."""
    n = len(x)
    flip = torch.rand(n, generator=g) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    if y is not None:
        y = y.clone()
        y[flip] = y[flip] * _MIRROR.to(y)
    scale = 1.0 + (torch.rand(n, generator=g) * 2 - 1) * s.max_scale
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * s.max_shift * 2  # grid units: 2 = width
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = 1.0 + (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * 0.2
    offset = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * 0.15
    x = x * gain + offset
    blur = torch.rand(n, generator=g) < s.blur_prob
    if blur.any():
        x[blur] = F.avg_pool2d(x[blur], 3, stride=1, padding=1, count_include_pad=False)
    return x, y


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5 % of the steps, then cosine to zero."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def planned_steps(n_images: int, settings: Any) -> int:
    """Steps a judge trains on ``n_images`` crops: ``settings.epochs`` epochs of whole batches,
    at most ``settings.max_steps`` (either judge's settings)."""
    per_epoch = max(1, n_images // settings.batch_size)
    return max(1, min(settings.epochs * per_epoch, settings.max_steps))


def fit(
    net: nn.Module,
    n_images: int,
    settings: Any,
    g: torch.Generator,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    progress: Callable[[int, torch.Tensor], None] | None = None,
) -> int:
    """Both judges' training loop: AdamW with :func:`lr_at`'s schedule over
    :func:`planned_steps` steps, each epoch a new order of the crops drawn from ``g``;
    ``batch_loss(indices)`` gives a batch's loss, ``progress(steps done, loss)`` hears of each
    step. Returns the steps taken."""
    s, total = settings, planned_steps(n_images, settings)
    per_epoch = max(1, n_images // s.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    net.train()
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(n_images, generator=g)
        k = step % per_epoch
        loss = batch_loss(order[k * s.batch_size : (k + 1) * s.batch_size])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, s.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1, loss.detach())
    return total


def train_pose_judge(
    images: np.ndarray,
    poses: np.ndarray,
    settings: JudgeSettings | None = None,
    info: dict | None = None,
    progress: Callable[[int, torch.Tensor], None] | None = None,
) -> PoseJudge:
    """Train a judge on real crops (uint8 ``[N, H, W, 3]``) and their poses (``[N, 3]`` deg);
    ``progress`` as in :func:`fit`.

    Only real images of training persons belong here: a judge that has seen generated images, or
    the held-out persons, would no longer be independent of what it judges.
    """
    s = settings or JudgeSettings()
    if len(images) != len(poses) or len(images) < 2:
        raise ValueError(f"need >= 2 images with one pose each, got {len(images)}, {len(poses)}")
    g = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)  # initialisation (layers draw from the global generator)
    net = PoseJudgeNet(s.input_size, s.width)
    x_all = resize_uint8(images, s.input_size)
    y_all = torch.as_tensor(np.asarray(poses, np.float32)) / POSE_SCALE_DEG

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        x, y = augment(x_all[idx], y_all[idx], s, g)
        return F.smooth_l1_loss(net(standardise(x)), y, beta=0.1)

    t0 = time.process_time()
    steps = fit(net, len(x_all), s, g, batch_loss, progress)
    meta = {"train_images": len(x_all), "train_steps": steps}
    meta["train_cpu_s"] = round(time.process_time() - t0, 1)
    return PoseJudge(net, s, {**meta, **(info or {})})


# ----------------------------------------------------------------------------- cache


def judge_cache_path(
    shards_dir: str | Path, cache_root: str | Path, settings: Any, kind: str = "pose"
) -> Path:
    """``<cache>/judges/<kind>-<fingerprint[:16]>-<image_size>-<shard settings>-<settings>.pt``.

    Keyed by what decides the judge's training data (the source fingerprint, image size, split
    ratios and split rule, alignment/framing and shard schema in ``manifest.json``; a manifest
    without a split rule was split by rule 1) and its settings (its step cap included), so a
    training run and ``evaluate`` on the same data share one frozen judge, and a judge trained
    on persons that another split rule holds out is never reused.
    """
    from controlnet_ray.judging.data import manifest_of

    m = manifest_of(shards_dir)
    split = [m.get("split_ratios"), m.get("split_rule", 1)]
    data = json.dumps([m.get("schema_version"), *split, m.get("alignment")], sort_keys=True)
    data_key = hashlib.sha256(data.encode()).hexdigest()[:8]
    name = f"{kind}-{m['fingerprint'][:16]}-{m['image_size']}-{data_key}-{settings.key()}.pt"
    return Path(cache_root) / "judges" / name


def ensure_pose_judge(
    shards_dir: str | Path,
    cache_root: str | Path,
    settings: JudgeSettings | None = None,
    verbose: bool = True,
    progress: str = "auto",
) -> PoseJudge:
    """The cached judge of this shard directory; trained on its train split and saved if absent
    (``verbose``: say so, with a progress bar or lines per ``progress``, as ``--progress``)."""
    from controlnet_ray.judging.data import MAX_TRAIN_ROWS, load_rows

    s = settings or JudgeSettings()
    path = judge_cache_path(shards_dir, cache_root, s)
    if path.is_file():
        if verbose:
            print(f"pose judge: reusing {path}", flush=True)
        return PoseJudge.load(path)
    rows = load_rows(shards_dir, ("train",), max_rows=MAX_TRAIN_ROWS)
    bar = announce("pose judge", len(rows), s, path, progress) if verbose else None
    judge = train_pose_judge(rows.images, rows.poses, s, {"shards": str(shards_dir)}, bar)
    judge.save(path)
    return judge


def announce(
    label: str, n_images: int, settings: Any, path: Path, mode: str
) -> Callable[[int, torch.Tensor], None]:
    """Say what a judge is about to train (crops, steps, the cap when it binds, where it goes)
    and return its progress (``controlnet_ray.progress.StepProgress``, bar or log lines)."""
    from controlnet_ray.progress import StepProgress

    steps = planned_steps(n_images, settings)
    capped = f" (capped at {settings.max_steps})" if steps == settings.max_steps else ""
    print(
        f"{label}: training on {n_images} real train-split crops, {steps} steps{capped} -> {path}",
        flush=True,
    )
    return StepProgress(label, steps, mode)
