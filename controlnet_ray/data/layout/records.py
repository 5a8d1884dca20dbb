"""The layout's file names and roles, its records (an entry, a skipped or unusual entry, the
validated dataset, one role's parsed arrays) and :class:`DataError`, whose messages name file,
entry and person (``_where``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FRONT_METADATA = "front_metadata.json"
VIDEO_METADATA = "video_metadata.json"
FRONT_KEYPOINTS = "front_keypoints.npy"
VIDEO_KEYPOINTS = "video_keypoints.npy"
SOURCE_FILES = (FRONT_METADATA, VIDEO_METADATA, FRONT_KEYPOINTS, VIDEO_KEYPOINTS)
ROLES = ("front", "video")
_FILES = {"front": (FRONT_METADATA, FRONT_KEYPOINTS), "video": (VIDEO_METADATA, VIDEO_KEYPOINTS)}


class DataError(ValueError):
    """The dataset on disk is inconsistent; the message names file, index, person and field."""


@dataclass(frozen=True)
class LegacyEntry:
    """One usable image of the dataset."""

    index: int  # row in its metadata file
    person_name: str
    role: str  # "front" | "video"
    frame_index: int  # trailing digits of the frame stem; -1 for fronts
    image_path: str  # as written in the metadata
    resolved_path: Path  # absolute, inside image_root_used
    image_size: tuple[int, int]  # (w, h)
    box: np.ndarray  # [4] float32
    landmarks_2d: np.ndarray  # [5,2] float32
    keypoints: np.ndarray  # [5,3] float32


@dataclass(frozen=True)
class EntryNote:
    """An entry named with a reason, as the shard manifest records it."""

    role: str
    index: int
    person_name: str
    image_path: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "index": self.index,
            "person_name": self.person_name,
            "image_path": self.image_path,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class SkippedImage(EntryNote):
    """An image left out under ``skip_bad_images`` (the manifest's ``skipped``)."""


@dataclass(frozen=True)
class UnusualEntry(EntryNote):
    """An entry kept and trained on although its geometry is unusual, e.g. the eyes' order
    reversed near profile (the manifest's ``unusual``; see ``data.plausibility``)."""


@dataclass
class LegacyDataset:
    """Validated content of a legacy data directory."""

    data_dir: Path
    image_root_used: Path
    entries: list[LegacyEntry]
    skipped: list[SkippedImage] = field(default_factory=list)
    standard_info: dict[str, Any] = field(default_factory=dict)
    source_image_paths: list[str] = field(default_factory=list)  # every metadata path
    unusual: list[UnusualEntry] = field(default_factory=list)  # kept, but recorded

    def __len__(self) -> int:
        return len(self.entries)

    def person_names(self) -> list[str]:
        return [e.person_name for e in self.entries]

    def roles(self) -> list[str]:
        return [e.role for e in self.entries]

    def landmarks_2d(self) -> np.ndarray:
        return np.stack([e.landmarks_2d for e in self.entries]).astype(np.float32)

    def image_sizes(self) -> np.ndarray:
        return np.array([e.image_size for e in self.entries], dtype=np.float32).reshape(-1, 2)


@dataclass
class _Part:
    """One role's parsed and shape-checked arrays (before image resolution)."""

    role: str
    persons: list[str]
    image_paths: list[str]
    frame_indices: list[int]
    sizes: np.ndarray  # [N,2] int
    boxes: np.ndarray  # [N,4]
    landmarks_2d: np.ndarray  # [N,5,2]
    keypoints: np.ndarray  # [N,5,3]
    standard_info: dict[str, Any]


def _where(file: str, index: int, persons: Sequence[str]) -> str:
    person = persons[index] if index < len(persons) else "?"
    return f"{file}: entry {index} (person {person!r})"
