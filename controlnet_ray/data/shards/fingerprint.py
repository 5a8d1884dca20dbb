"""The shard cache's keys: the source fingerprint (what was read) and the settings hash (how it
was prepared). See the package docstring for what each covers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from controlnet_ray.data.layout import FRONT_METADATA, SOURCE_FILES, VIDEO_METADATA
from controlnet_ray.data.pairs import SPLIT_RULE, normalise_ratios
from controlnet_ray.data.shards.schema import SCHEMA_VERSION


def fingerprint_source(data_dir: str | Path, image_root: str | Path) -> str:
    """sha256 over the 4 metadata/keypoint files' bytes and each image's path, size, mtime.

    Images are stat-ed, not read (fast); a missing image is hashed as missing, so restoring it
    changes the fingerprint.
    """
    ddir = Path(data_dir)
    paths = []
    for name in (FRONT_METADATA, VIDEO_METADATA):
        with open(ddir / name, encoding="utf-8") as f:
            paths += [str(m.get("image_path", "")) for m in json.load(f).get("metadata", [])]
    return _fingerprint(ddir, Path(image_root), paths)


def _fingerprint(ddir: Path, root: Path, image_paths: Sequence[str]) -> str:
    h = hashlib.sha256(b"controlnet-ray-source-v1\n")
    for name in SOURCE_FILES:
        h.update(name.encode() + b"\0" + _file_digest(ddir / name).encode() + b"\n")
    for raw in image_paths:
        rel = raw.replace("\\", "/")
        try:
            st = os.stat(root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings_hash(split_ratios: Sequence[float], framing: str) -> str:
    """8 hex digits of the normalised ratios, the split rule (``pairs.SPLIT_RULE``), framing and
    schema version (part of the cache key): a schema or split-rule change therefore rebuilds
    old caches instead of misreading them or reusing another rule's split."""
    doc = {
        "ratios": [round(r, 9) for r in normalise_ratios(split_ratios)],
        "v": SCHEMA_VERSION,
        "framing": framing,
        "split_rule": SPLIT_RULE,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:8]
