"""The identity judge: a small CNN that embeds a crop's face region, never a training loss.

Why learned, not pixels: a video's frames share their lighting, colour cast and background, and
a per-pixel descriptor mostly matches those -- on the embedded dataset the source ID photo of the
right person, at nearly the target's pose, was retrieved for only 69 % of near-frontal targets
by a 16-px standardised-pixel distance, while real frames of the same video reached 90 %.  A
generator cannot know a video's lighting from the ID photo, so such a judge scores the lighting,
not the person.  This judge is trained to tell the *training* persons apart on their real crops
(ID photos and video frames), with mirror, framing, colour-cast and blur augmentation, and is
then frozen: it never sees a generated image or a held-out person, and the generator never
trains against it.  Retrieval of held-out persons in its embedding space is the identity figure
(``report.Scorer``); the pixel descriptor stays in the report beside it.

Design: the pose judge's stages (GroupNorm, 64 px), the face region of the framing only
(standardised over its pixels, everything else zeroed: backgrounds identify nobody), global
average pooling (identity is *what*, not *where*), a 64-d unit embedding and a normalised-softmax
classifier with an additive margin (CosFace), which makes same-person embeddings cluster by
angle -- what retrieval by distance needs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from controlnet_ray.config import DataConfig
from controlnet_ray.judging.pose_judge import (
    JUDGE_MAX_STEPS,
    FrozenJudge,
    _stage,
    announce,
    augment,
    fit,
    judge_cache_path,
    load_net,
    resize_uint8,
    save_net,
)
from controlnet_ray.metrics import face_mask

IDENTITY_JUDGE_VERSION = 1


@dataclass(frozen=True)
class IdentitySettings:
    """Everything that changes the trained identity judge (part of its cache key)."""

    input_size: int = 64
    width: int = 16
    dim: int = 64  # embedding size
    epochs: int = 40
    max_steps: int = JUDGE_MAX_STEPS  # caps training on large datasets (see pose_judge)
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    scale: float = 16.0  # logit scale of the normalised softmax
    margin: float = 0.2  # additive cosine margin of the true class
    max_shift: float = 0.06
    max_scale: float = 0.06
    blur_prob: float = 0.3
    tint: float = 0.3  # per-channel gain jitter: a video's colour cast is not identity
    framing: str = DataConfig.framing  # decides the face region kept; the data's default
    seed: int = 0

    def key(self) -> str:
        """Short hash of the settings and the judge version."""
        doc = json.dumps({"version": IDENTITY_JUDGE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:12]


class IdentityJudgeNet(nn.Module):
    """Four stride-2 stages, global average pool, linear to a unit embedding; ``classes`` holds
    one direction per training person (used only while training)."""

    def __init__(self, settings: IdentitySettings, num_classes: int) -> None:
        super().__init__()
        w = settings.width
        chans = [3, w, 2 * w, 4 * w, 8 * w]
        self.features = nn.Sequential(
            *(_stage(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True))
        )
        self.embed = nn.Linear(chans[-1], settings.dim)
        self.classes = nn.Parameter(0.1 * torch.randn(num_classes, settings.dim))
        region = face_mask(settings.input_size, settings.framing).float()
        self.register_buffer("region", region, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, s, s]`` in ``[-1, 1]`` -> ``[N, dim]`` unit embeddings; pixels outside the
        face region change nothing (standardised over the region, zero outside)."""
        m = self.region
        count = m.sum() * x.shape[1]
        mean = (x * m).sum(dim=(1, 2, 3), keepdim=True) / count
        var = (((x - mean) * m) ** 2).sum(dim=(1, 2, 3), keepdim=True) / count
        z = self.features((x - mean) / var.sqrt().clamp(min=1e-3) * m)
        return F.normalize(self.embed(z.mean(dim=(2, 3))), dim=1)


class IdentityJudge(FrozenJudge):
    """A frozen identity judge: ``judge(images) -> [N, dim]`` unit embeddings."""

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def __call__(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Embeddings ``[N, dim]`` (CPU float32) of ``[N, 3, H, W]`` images in ``[-1, 1]``."""
        return self._batched(images, self.settings.dim, batch_size)

    def save(self, path: str | Path) -> None:
        """Atomic write of weights, settings and info (loadable with ``weights_only=True``)."""
        info = {**self.info, "num_classes": int(self.net.classes.shape[0])}
        save_net(path, self.net, IDENTITY_JUDGE_VERSION, asdict(self.settings), info)

    @classmethod
    def load(cls, path: str | Path) -> IdentityJudge:
        """A judge saved by :meth:`save`."""
        state, doc = load_net(path, IDENTITY_JUDGE_VERSION, "identity judge")
        settings = IdentitySettings(**doc["settings"])
        net = IdentityJudgeNet(settings, int(doc["info"]["num_classes"]))
        net.load_state_dict(state)
        return cls(net, settings, doc.get("info"))


def train_identity_judge(
    images: np.ndarray,
    persons: np.ndarray,
    settings: IdentitySettings | None = None,
    info: dict | None = None,
    progress: Callable[[int, torch.Tensor], None] | None = None,
) -> IdentityJudge:
    """Train on real crops (uint8 ``[N, H, W, 3]``) labelled by person (``[N]`` names);
    ``progress`` as in ``pose_judge.fit``.

    Only real images of training persons belong here (see the module docstring)."""
    s = settings or IdentitySettings()
    names = sorted(set(np.asarray(persons).tolist()))
    if len(images) != len(persons) or len(names) < 2:
        raise ValueError(f"need images of >= 2 persons, got {len(images)} of {len(names)}")
    labels = torch.tensor([names.index(p) for p in np.asarray(persons).tolist()])
    g = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)  # initialisation
    net = IdentityJudgeNet(s, len(names))
    x_all = resize_uint8(images, s.input_size)
    t0 = time.process_time()

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return _step_loss(net, x_all[idx], labels[idx], s, g)

    steps = fit(net, len(x_all), s, g, batch_loss, progress)
    meta = {"train_images": len(x_all), "train_persons": len(names), "train_steps": steps}
    meta["train_cpu_s"] = round(time.process_time() - t0, 1)
    return IdentityJudge(net, s, {**meta, **(info or {})})


def _step_loss(
    net: IdentityJudgeNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    s: IdentitySettings,
    g: torch.Generator,
) -> torch.Tensor:
    """CosFace loss of one augmented batch."""
    x, _ = augment(x, None, s, g)
    x = x * (1.0 + (torch.rand(len(x), 3, 1, 1, generator=g) * 2 - 1) * s.tint)
    cos = net(x) @ F.normalize(net.classes, dim=1).T
    margin = s.margin * F.one_hot(labels, cos.shape[1])
    return F.cross_entropy(s.scale * (cos - margin), labels)


def default_identity_settings(shards_dir: str | Path) -> IdentitySettings:
    """The identity judge's settings for a shard directory: the defaults at its framing."""
    from controlnet_ray.judging.data import manifest_of

    return IdentitySettings(framing=manifest_of(shards_dir)["framing"])


def ensure_identity_judge(
    shards_dir: str | Path,
    cache_root: str | Path,
    settings: IdentitySettings | None = None,
    verbose: bool = True,
    progress: str = "auto",
) -> IdentityJudge:
    """The cached identity judge of this shard directory; trained on its train split if absent
    (``verbose`` and ``progress`` as in ``pose_judge.ensure_pose_judge``)."""
    from controlnet_ray.judging.data import MAX_TRAIN_ROWS, load_rows

    s = settings or default_identity_settings(shards_dir)
    path = judge_cache_path(shards_dir, cache_root, s, kind="identity")
    if path.is_file():
        if verbose:
            print(f"identity judge: reusing {path}", flush=True)
        return IdentityJudge.load(path)
    rows = load_rows(shards_dir, ("train",), max_rows=MAX_TRAIN_ROWS)
    bar = announce("identity judge", len(rows), s, path, progress) if verbose else None
    judge = train_identity_judge(rows.images, rows.person, s, {"shards": str(shards_dir)}, bar)
    judge.save(path)
    return judge
