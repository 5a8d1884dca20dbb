"""The original research script's on-disk dataset layout: writer, reader and validation.

``DATA_DIR`` holds ``front_metadata.json`` / ``video_metadata.json`` (per-image metadata plus
legacy poses, boxes, 2D landmarks and PnP landmarks) and ``front_keypoints.npy`` /
``video_keypoints.npy`` ([N,5,3] normalised legacy keypoints, rows in metadata order). Image
paths in the JSON are relative to the original repository root and use backslashes
(``train\\datas\\face\\<name>.jpg``), because the original ran on Windows from that root.

Users already have data in this layout, so the reader is strict about consistency (counts,
shapes, finite numbers, images present and inside the image root) and names file, index,
person and field in every error rather than training on zeros. The writer exists so that tests
and the synthetic renderer produce byte-for-byte the schema the original wrote.

Modules: ``records`` (file names, entries, the dataset, ``DataError``), ``writer``, ``reader``
(``read_legacy_dataset``), ``parsing`` (JSON + npy checks), ``image_paths`` (path safety, the
image root), ``bad_images`` (impossible, repeated and missing images; unusual ones, kept). The
names below are re-exported so ``controlnet_ray.data.layout.<name>`` keeps working.
"""

from controlnet_ray.data.layout.bad_images import describe_bad_images, describe_unusual
from controlnet_ray.data.layout.reader import read_legacy_dataset
from controlnet_ray.data.layout.records import (
    FRONT_METADATA,
    SOURCE_FILES,
    VIDEO_METADATA,
    DataError,
    LegacyDataset,
    SkippedImage,
    UnusualEntry,
)
from controlnet_ray.data.layout.writer import ImageRecord, write_legacy_dataset

__all__ = [
    "FRONT_METADATA",
    "SOURCE_FILES",
    "VIDEO_METADATA",
    "DataError",
    "ImageRecord",
    "LegacyDataset",
    "SkippedImage",
    "UnusualEntry",
    "describe_bad_images",
    "describe_unusual",
    "read_legacy_dataset",
    "write_legacy_dataset",
]
