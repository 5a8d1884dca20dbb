"""Decode + align workers: each chunk of images is decoded (PIL, strict), cropped and
PNG-encoded in a process pool, inline, or in Ray tasks across a multi-node cluster; results
come back in task order with at most a window of chunks in flight."""

from __future__ import annotations

import concurrent.futures as cf
import sys
from collections.abc import Iterator

import cv2
import numpy as np
from PIL import Image

from controlnet_ray.data.align import crop
from controlnet_ray.data.pools import (
    RayTasks,
    pool_workers,
    process_pool,
    ray_cluster_cpus,
    windowed,
)

_MIN_IMAGES_FOR_POOL = 1000  # ~3 s of inline work: below it, spawning workers costs more


def _init_worker() -> None:
    """One OpenCV thread per process: parallelism comes from the processes."""
    cv2.setNumThreads(1)


def _decode_rgb(path: str, expected: tuple[int, int]) -> np.ndarray:
    """Full decode with PIL (raises on truncated JPEGs, which OpenCV would half-decode)."""
    with Image.open(path) as im:
        if tuple(im.size) != tuple(expected):
            raise ValueError(f"decoded size {im.size[0]}x{im.size[1]} != metadata image_size")
        im.load()
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _align_one(path: str, matrix: np.ndarray, size: tuple[int, int], image_size: int) -> bytes:
    rgb = crop(_decode_rgb(path, size), matrix, image_size)
    ok, buf = cv2.imencode(
        ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]
    )
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def _align_chunk(task: tuple[list[tuple], int]) -> list[tuple[int, bytes | None, str | None]]:
    """(row, png bytes or None, error or None) for each image of a chunk."""
    items, image_size = task
    out = []
    for row, path, matrix, size in items:
        try:
            out.append((row, _align_one(path, matrix, size, image_size), None))
        except Exception as exc:  # noqa: BLE001 - any decode failure is a bad image, reported
            out.append((row, None, f"{type(exc).__name__}: {exc}"))
    return out


def _align_chunk_one_thread(task: tuple[list[tuple], int]) -> list:
    """:func:`_align_chunk` in a Ray task: one OpenCV thread, as Ray granted one CPU."""
    _init_worker()
    return _align_chunk(task)


def _run_alignment(
    tasks: list[tuple[list[tuple], int]], num_workers: int, total: int
) -> Iterator[tuple[int, bytes | None, str | None]]:
    """Results in task order; a process pool when num_workers > 1, else inline."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="decode+align", unit="img", file=sys.stderr, mininterval=1.0)
    try:
        cluster_cpus = ray_cluster_cpus()
        if cluster_cpus:
            print(
                f"decode+align: Ray tasks over the cluster's {cluster_cpus} CPUs "
                "(not the driver's processes)",
                flush=True,
            )
            # Every node must see the source images at the same paths; the crops (PNG, a few
            # KB each) come back here and are written as a local preparation writes them.
            ray_tasks = RayTasks(2 * cluster_cpus)
            yield from _tick(ray_tasks.map(_align_chunk_one_thread, tasks), bar)
            print(f"decode+align: Ray tasks ran on node(s) {ray_tasks.where()}", flush=True)
            return
        workers = pool_workers(num_workers)
        if workers <= 1 or total < _MIN_IMAGES_FOR_POOL:
            yield from _tick(map(_align_chunk, tasks), bar)
            return
        with process_pool("shards: decoding and aligning images", workers, _init_worker) as ex:
            yield from _tick(_windowed(ex, tasks, 4 * workers), bar)
    finally:
        bar.close()


def _windowed(ex: cf.Executor, tasks: list, window: int) -> Iterator[list]:
    """Ordered results with at most ``window`` chunks in flight, so memory stays bounded."""
    return windowed(lambda task: ex.submit(_align_chunk, task), cf.Future.result, tasks, window)


def _tick(results: Iterator, bar) -> Iterator[tuple[int, bytes | None, str | None]]:
    for chunk in results:
        bar.update(len(chunk))
        yield from chunk
