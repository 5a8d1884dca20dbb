"""Shard rows as numpy arrays, and the evaluation set every predictor is judged on.

Reads the Parquet shards with pyarrow directly (not ``controlnet_ray.data.shards``, which pulls in
insightface for alignment), so the judges also run on a machine that only has the shards.
Images are kept as uint8 RGB ``[N, H, W, 3]``: a 40-identity set is 25 MB that way, and each
consumer converts to what it needs (the judge downsamples, the scorer maps to ``[-1, 1]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from controlnet_ray.data.decode import decode_rgb

AXES = ("yaw", "pitch", "roll")
SPLITS = ("train", "val", "test")
_COLUMNS = ["person_name", "split", "role", "image", "yaw", "pitch", "roll"]


@dataclass
class Rows:
    """Shard rows: names, roles, splits, uint8 RGB images ``[N, H, W, 3]``, poses ``[N, 3]``."""

    person: np.ndarray
    split: np.ndarray
    role: np.ndarray
    images: np.ndarray
    poses: np.ndarray  # float32 degrees (yaw, pitch, roll)

    def __len__(self) -> int:
        return len(self.person)

    def subset(self, keep: np.ndarray) -> Rows:
        """The rows selected by a bool mask or index array."""
        return Rows(
            *(getattr(self, f)[keep] for f in ("person", "split", "role", "images", "poses"))
        )

    def columns(self) -> dict[str, np.ndarray]:
        """The columns ``controlnet_ray.data.pairs.make_pairs`` reads."""
        return {
            "person_name": self.person,
            "role": self.role,
            **{a: self.poses[:, i] for i, a in enumerate(AXES)},
        }


def manifest_of(shards_dir: str | Path) -> dict:
    """``manifest.json`` of a shard directory as a dict."""
    return json.loads((Path(shards_dir) / "manifest.json").read_text(encoding="utf-8"))


#: Training rows the judge and the trivial predictors are fitted on, at most (an even subset):
#: the 400-identity embedded set has 7275; a user's dataset may have a hundred times more.
MAX_TRAIN_ROWS = 10_000


def load_rows(
    shards_dir: str | Path, splits: Sequence[str] = SPLITS, max_rows: int | None = None
) -> Rows:
    """The rows of ``splits`` of a shard directory, decoded, in shard order; an even subset of
    at most ``max_rows`` when given (decoded images cost 37 KB each at 112 px: a user's 100k
    training frames would not fit in a worker's memory just to fit a baseline)."""
    import pyarrow.parquet as pq

    manifest = manifest_of(shards_dir)
    files = [Path(shards_dir) / f for s in splits for f in manifest["shards"].get(s, [])]
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    keep = np.arange(sum(sizes))
    if max_rows is not None and len(keep) > max_rows:
        keep = np.linspace(0, len(keep) - 1, max_rows).round().astype(int)
    cols: dict[str, list] = {c: [] for c in _COLUMNS}
    start = 0
    for f, n in zip(files, sizes, strict=True):
        local = keep[(keep >= start) & (keep < start + n)] - start
        start += n
        if len(local) == 0:
            continue
        table = pq.read_table(f, columns=_COLUMNS).take(local)
        for c in _COLUMNS:
            cols[c].extend(table.column(c).to_pylist())
    if not cols["image"]:
        raise ValueError(f"{shards_dir}: no rows in splits {list(splits)}")
    poses = np.stack([np.asarray(cols[a], np.float32) for a in AXES], axis=1)
    return Rows(
        np.asarray(cols["person_name"], dtype=object),
        np.asarray(cols["split"], dtype=object),
        np.asarray(cols["role"], dtype=object),
        decode_rgb(cols["image"]),
        poses,
    )


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` in ``[-1, 1]`` (the model's range)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``[N, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[N, H, W, 3]`` (clamped, rounded)."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).clamp(0, 255).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass
class EvalSet:
    """What every predictor is judged on: pairs plus the held-out persons' real frames.

    ``gallery`` holds every real video frame of the held-out persons (the identity candidates
    are drawn from it per pair); ``target_row`` is each pair's target's index into it, so the
    scorer can leave the answer itself out of the candidates.
    """

    source: torch.Tensor  # [P, 3, H, W] in [-1, 1]
    target: torch.Tensor
    source_pose: torch.Tensor  # [P, 3] degrees
    target_pose: torch.Tensor
    person: np.ndarray  # [P] names
    gallery: Rows
    target_row: np.ndarray  # [P] index into gallery

    def __len__(self) -> int:
        return len(self.person)


def build_eval_set(rows: Rows, pairs: np.ndarray) -> EvalSet:
    """An :class:`EvalSet` from held-out rows and ``[P, 2]`` (source, target) row indices.

    The gallery is the frames of the persons in ``rows`` with a role some target has (video
    frames for front_to_video pairs: a front photo's plain background and even light would make
    it stand out from every video frame and every generated image).
    """
    if len(pairs) == 0:
        raise ValueError("no pairs to evaluate")
    src, tgt = pairs[:, 0], pairs[:, 1]
    video = np.flatnonzero(np.isin(rows.role, np.unique(rows.role[tgt])))
    position = {int(r): k for k, r in enumerate(video)}
    return EvalSet(
        source=to_model_range(rows.images[src]),
        target=to_model_range(rows.images[tgt]),
        source_pose=torch.from_numpy(rows.poses[src]),
        target_pose=torch.from_numpy(rows.poses[tgt]),
        person=rows.person[src],
        gallery=rows.subset(video),
        target_row=np.asarray([position[int(t)] for t in tgt], np.int64),
    )
