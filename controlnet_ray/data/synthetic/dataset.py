"""The dataset on disk: every identity rendered (in worker processes, byte-identical for any
worker count) into the original layout plus ``ground_truth.json``, and the cache that renders
a spec once under ``<cache>/synthetic/<SyntheticSpec.digest()>``."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from controlnet_ray.data.pools import pool_workers, process_pool
from controlnet_ray.data.synthetic.identity import make_identity
from controlnet_ray.data.synthetic.spec import RENDER_VERSION, SyntheticSpec
from controlnet_ray.data.synthetic.views import (
    front_view,
    identity_rngs,
    person_name,
    render_view,
    video_views,
)

JPEG_QUALITY = 92
FACE_DIR = "train/datas/face"
VIDEO_DIR = "train/datas/video"
DATA_DIR = "train/datas/file"


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    """Encode in memory and write bytes (works for non-ASCII paths on every platform)."""
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _render_identity(args: tuple[SyntheticSpec, int, str]) -> dict[str, Any]:
    """Render and write one identity's images; returns plain data for the metadata (picklable)."""
    spec, index, root_s = args
    root = Path(root_s)
    name = person_name(index, spec.num_identities)
    id_rng, view_rng, noise_rng = identity_rngs(spec.seed, index)
    ident = make_identity(id_rng)
    views = [front_view(view_rng), *video_views(view_rng, spec.frames_per_identity)]
    images = []
    for view in views:
        rgb, lm, box = render_view(ident, view, spec.image_px, noise_rng)
        if view.role == "front":
            rel, frame = f"{FACE_DIR}/{name}.jpg", None
        else:
            frame = f"{name}frame_{view.index:06d}"
            rel = f"{VIDEO_DIR}/{name}/{frame}.jpg"
        _write_jpeg(root / rel, rgb)
        images.append(
            {
                "person_name": name,
                "role": view.role,
                "image_relpath": rel,
                "frame_index": frame,
                "yaw": float(view.yaw),
                "pitch": float(view.pitch),
                "roll": float(view.roll),
                "translation": view.placement.translation().tolist(),
                "landmarks_2d": np.round(lm, 4).tolist(),
                "box": box.tolist(),
            }
        )
    return {"person_name": name, "landmarks_3d": ident.landmarks_3d.tolist(), "images": images}


def _map_identities(spec: SyntheticSpec, root: Path, num_workers: int) -> list[dict[str, Any]]:
    jobs = [(spec, i, str(root)) for i in range(spec.num_identities)]
    workers = pool_workers(num_workers, spec.num_identities)
    if workers == 1:
        return [_render_identity(j) for j in jobs]
    with process_pool("synthetic: rendering identities", workers) as pool:
        return list(pool.map(_render_identity, jobs))


def render_dataset(root: Path, spec: SyntheticSpec, num_workers: int = 1) -> Path:
    """Render ``spec`` into the original layout under ``root``; returns ``root/train/datas/file``.

    Output bytes do not depend on ``num_workers`` (every identity has its own seed).
    """
    from controlnet_ray.data.layout import ImageRecord, write_legacy_dataset

    root = Path(root)
    people = _map_identities(spec, root, num_workers)
    records: dict[str, list[Any]] = {"front": [], "video": []}
    for person in people:
        for im in person["images"]:
            records[im["role"]].append(
                ImageRecord(
                    person_name=im["person_name"],
                    image_relpath=im["image_relpath"],
                    image_size=(spec.image_px, spec.image_px),
                    box=np.asarray(im["box"], dtype=np.float64),
                    landmarks_2d=np.asarray(im["landmarks_2d"], dtype=np.float64),
                    frame_index=im["frame_index"],
                )
            )
    data_dir = root / DATA_DIR
    write_legacy_dataset(data_dir, records["front"], records["video"], repo_root=root)
    _write_ground_truth(root, spec, people)
    return data_dir


def _write_ground_truth(root: Path, spec: SyntheticSpec, people: list[dict[str, Any]]) -> None:
    images = [
        im
        for role in ("front", "video")
        for p in people
        for im in p["images"]
        if im["role"] == role
    ]
    doc = {
        "render_version": RENDER_VERSION,
        "spec": dataclasses.asdict(spec),
        "convention": "controlnet_ray.data.geometry (degrees; focal = image width)",
        "head_frame": "mm; x viewer's right, y up, z to the viewer; origin at the skull centre",
        "landmark_order": ["left_eye", "right_eye", "nose_tip", "left_mouth", "right_mouth"],
        "persons": {p["person_name"]: {"landmarks_3d": p["landmarks_3d"]} for p in people},
        "images": images,
    }
    text = _json_one_line_per_item(doc, ("persons", "images"))
    (root / "ground_truth.json").write_text(text, encoding="utf-8")


def _json_one_line_per_item(doc: dict[str, Any], blocks: tuple[str, ...]) -> str:
    """JSON with one line per entry of the ``blocks`` fields: readable, and every line is
    encoded by json's fast C encoder (``indent`` would switch to the slow pure-Python one)."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    parts = []
    for key, value in doc.items():
        if key in blocks and isinstance(value, dict):
            text = "{\n  " + ",\n  ".join(f"{dump(k)}: {dump(v)}" for k, v in value.items())
            text += "\n}"
        elif key in blocks:
            text = "[\n  " + ",\n  ".join(dump(v) for v in value) + "\n]"
        else:
            text = dump(value)
        parts.append(f"{dump(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock: concurrent callers (processes, Ray workers) wait here."""
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_synthetic_dataset(cache_root: Path, spec: SyntheticSpec, num_workers: int = 1) -> Path:
    """The data_dir of ``spec`` under ``cache_root/synthetic/<hash>``, rendering it once.

    Rendering goes to a temp dir that is renamed into place, so the folder is either absent or
    complete; a concurrent caller blocks on the lock, then reuses the finished folder.
    """
    base = Path(cache_root).expanduser() / "synthetic"
    base.mkdir(parents=True, exist_ok=True)
    final = base / spec.digest()
    if final.is_dir():
        print(f"reusing synthetic dataset at {final}", flush=True)
        return final / DATA_DIR
    with _file_lock(base / f"{spec.digest()}.lock"):
        if final.is_dir():
            print(f"reusing synthetic dataset at {final}", flush=True)
            return final / DATA_DIR
        for stale in base.glob(f".{final.name}-*"):  # left by a killed renderer; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        desc = (
            f"{spec.num_identities} identities x {spec.frames_per_identity} frames, "
            f"seed {spec.seed}, {spec.image_px} px"
        )
        print(f"generating synthetic dataset ({desc}) at {final} ...", flush=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=base))
        try:
            render_dataset(tmp, spec, num_workers)
            # A whole folder, published once under the lock (files.atomic_write replaces files).
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        n = spec.num_identities * (1 + spec.frames_per_identity)
        print(
            f"synthetic dataset ready: {n} images in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return final / DATA_DIR
