"""Poses for a whole legacy dataset: bundle adjustment per person in two passes (the second
around the dataset's own mean face), the generic estimate with a measured bias for the rest,
and the report of what was done."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from controlnet_ray.data.pools import RayTasks, pool_workers, process_pool, ray_cluster_cpus
from controlnet_ray.data.pose.bundle import BundleConfig, PersonFit, fit_person
from controlnet_ray.data.pose.evidence import CLEAR_TURN, nose_offset, yaw_contradicts
from controlnet_ray.data.pose.mean_face import MEAN_FACE_3D, NOSE
from controlnet_ray.data.pose.photo import PhotoPoseModel
from controlnet_ray.data.pose.rotations import _rot_from_ypr_batch
from controlnet_ray.data.pose.single_image import PoseFitError, estimate_poses_generic
from controlnet_ray.data.pose.validation import _as_landmarks, _as_shape, _as_sizes


def _shape_in_front_frame(fit: PersonFit, front_mask: np.ndarray) -> np.ndarray:
    """The fitted shape rotated into the frame in which the person's front photo is frontal."""
    s = fit.shape
    idx = np.flatnonzero(front_mask)
    if idx.size:
        # average front rotation (projected back onto SO(3)); usually one photo
        m = _rot_from_ypr_batch(fit.poses[idx]).sum(axis=0)
        u, _, vt = np.linalg.svd(m)
        rf = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
        s = s @ rf.T
    return s


def mean_face_from_fits(
    shapes: Sequence[np.ndarray], scale_like: np.ndarray = MEAN_FACE_3D
) -> np.ndarray:
    """Mean face of several fitted shapes: centred, scaled to ``scale_like``'s size, averaged
    (coordinate-wise median, robust to a few bad fits), mirror-symmetrised, nose tip moved to
    the origin."""
    ref = scale_like - scale_like.mean(axis=0)
    ref_size = np.sqrt(np.sum(ref**2))
    acc = []
    for s in shapes:
        c = s - s.mean(axis=0)
        acc.append(c * (ref_size / np.sqrt(np.sum(c**2))))
    m = np.median(acc, axis=0)
    mirrored = m[[1, 0, 2, 4, 3]] * np.array([-1.0, 1.0, 1.0])
    m = 0.5 * (m + mirrored)
    m[NOSE, 0] = 0.0
    return m - m[NOSE]


@dataclass
class PoseReport:
    """What :func:`estimate_dataset_poses` did."""

    n_images: int = 0
    n_persons: int = 0
    n_bundle_persons: int = 0
    n_generic_persons: int = 0
    generic_persons: list[str] = field(default_factory=list)
    generic_reasons: dict[str, str] = field(default_factory=dict)
    n_not_converged: int = 0
    n_front_photos_ignored: int = 0  # "front" photos > 4 sigma off frontal (prior dropped)
    not_converged_persons: list[str] = field(default_factory=list)
    # persons with images whose final yaw contradicts the nose's side (data.pose.evidence)
    yaw_contradicted: dict[str, str] = field(default_factory=dict)
    median_rms_px: float = float("nan")  # over bundle-adjusted persons
    p90_rms_px: float = float("nan")
    min_images: int = 4
    mean_face_refined: bool = False
    mean_face_persons: int = 0  # persons whose shapes made the dataset mean face
    mean_face: list[list[float]] = field(default_factory=list)  # [5,3] used for pass 2 / fallback
    generic_bias_deg: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    seconds: float = 0.0
    ms_per_person: float = 0.0
    num_workers: int = 1  # processes that fitted persons (1: in-process; Ray tasks: the CPUs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("median_rms_px", "p90_rms_px"):
            if not math.isfinite(d[key]):
                d[key] = None
        return d


def _fit_chunk(args) -> list[PersonFit]:
    items, mean, cfg = args
    out = []
    for lm, sz, fm, init in items:
        try:
            fit = fit_person(lm, sz, fm, mean_shape=mean, config=cfg, init=init, min_images=2)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError) as exc:
            # a numeric failure: the person falls back to the single-image estimate, named
            nan = np.full((lm.shape[0], 3), np.nan)
            fit = PersonFit(nan, mean, nan, float("nan"), "bundle", False, error=str(exc))
        out.append(fit)
    return out


def _contradicted(poses: np.ndarray, lm: np.ndarray) -> tuple[int, int]:
    """(images whose yaw contradicts their nose's side, clearly turned images) of a person."""
    clear = np.abs(nose_offset(lm)) >= CLEAR_TURN
    return int(yaw_contradicts(poses[:, 0], lm).sum()), int(clear.sum())


def _run_fits(items, mean, cfg, pool: ProcessPoolExecutor | RayTasks | None, workers: int):
    """Fits in person order: inline, or chunked over a process pool or Ray tasks (same
    results: every person is fitted alone)."""
    if pool is None:
        return _fit_chunk((items, mean, cfg))
    n_chunks = min(len(items), workers * 4)
    bounds = np.linspace(0, len(items), n_chunks + 1).astype(int)
    chunks = [
        (items[a:b], mean, cfg) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a
    ]
    return [fit for chunk in pool.map(_fit_chunk, chunks) for fit in chunk]


def _fitters(workers: int, persons: int) -> tuple[Any, int]:
    """Where both passes fit their persons, and over how many workers: Ray tasks when this
    process is connected to a multi-node cluster (``pools.ray_cluster_cpus``, the decision the
    decode + align step takes too), else a process pool when there are at least two persons
    per worker, else inline (1)."""
    cluster_cpus = ray_cluster_cpus() if persons else 0
    if cluster_cpus:
        print(
            f"pose: fitting {persons} persons as Ray tasks over the cluster's {cluster_cpus} "
            "CPUs (not the driver's processes)",
            flush=True,
        )
        return nullcontext(RayTasks(2 * cluster_cpus)), cluster_cpus
    if workers > 1 and persons >= 2 * workers:
        return process_pool("pose: fitting persons", workers), workers
    return nullcontext(), 1


def estimate_dataset_poses(
    person_names: Sequence[str],
    roles: Sequence[str],
    landmarks_2d: np.ndarray,
    sizes: np.ndarray,
    min_images: int = 4,
    *,
    num_workers: int | None = 1,
    config: BundleConfig | None = None,
    refine_mean: bool = True,
    min_persons_for_mean: int = 5,
    mean_face_max_persons: int = 150,
    mean_shape: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[np.ndarray, PoseReport]:
    """(yaw, pitch, roll) for every image of a legacy dataset -> (poses [N,3] float32, report).

    Images are grouped by ``person_names``; ``roles[i] == "front"`` (any case) marks ID photos.
    Persons with at least ``min_images`` images are bundle-adjusted.  With ``refine_mean`` and
    at least ``min_persons_for_mean`` such persons, a first pass over at most
    ``mean_face_max_persons`` of them (evenly spread, those with a front photo) around
    ``mean_shape`` (default :data:`MEAN_FACE_3D`) gives the dataset's mean face -- each shape
    rotated into its front photo's frame, so the population's pitch zero is "ID photos are
    frontal on average" -- and every person is then fitted around that mean.  The other
    persons (too few images, or a fit that did not converge) get the generic estimate with the
    dataset mean face plus the median (bundle - generic) offset measured on the
    bundle-adjusted persons (applied only with at least ``min_persons_for_mean`` of them); the
    report names them.  ``num_workers`` > 1 fits persons in a spawned process pool (None: all
    usable CPUs, never more than those: :func:`controlnet_ray.data.pools.pool_workers`; used
    when there are at least two persons per worker). Connected to a multi-node Ray cluster,
    the persons are fitted as Ray tasks on its nodes instead, whatever ``num_workers``.

    Every person's fitted yaws are checked against the 2D evidence
    (:mod:`controlnet_ray.data.pose.evidence`): a bundle fit whose yaw contradicts the nose's
    side in more than half of the clearly turned images is replaced by the single-image
    estimates, and persons with any contradicted image are named in
    ``report.yaw_contradicted``.  A numeric failure raises :class:`PoseFitError` naming the
    person and the image (``labels[i]``, e.g. its file, else its index).
    """
    t_start = time.perf_counter()
    cfg = config or BundleConfig()
    lm = _as_landmarks(landmarks_2d, "landmarks_2d", batched=True)
    n = lm.shape[0]
    sz = _as_sizes(sizes, "sizes", n)
    names = list(person_names)
    role_list = list(roles)
    if len(names) != n:
        raise ValueError(f"person_names has {len(names)} entries, landmarks_2d has {n} images")
    if len(role_list) != n:
        raise ValueError(f"roles has {len(role_list)} entries, landmarks_2d has {n} images")
    if min_images < 2:
        raise ValueError(f"min_images must be >= 2, got {min_images}")
    front = np.array([str(r).lower() == "front" for r in role_list], dtype=bool)
    workers = pool_workers(num_workers)
    mean0 = MEAN_FACE_3D if mean_shape is None else _as_shape(mean_shape, "mean_shape")
    mean0 = mean0 - mean0[NOSE]

    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(str(name), []).append(i)
    bundle_names = [p for p, idx in groups.items() if len(idx) >= min_images]
    generic_names = [p for p, idx in groups.items() if len(idx) < min_images]
    reasons = {p: f"{len(groups[p])} image(s) < min_images={min_images}" for p in generic_names}

    poses = np.zeros((n, 3))
    items = [(lm[groups[p]], sz[groups[p]], front[groups[p]], None) for p in bundle_names]
    pooled, used_workers = _fitters(workers, len(items))
    with pooled as pool:
        mean, refined, mean_persons = mean0, False, 0
        if refine_mean and len(bundle_names) >= min_persons_for_mean:
            # pass 1 on (at most mean_face_max_persons, evenly spread) persons with a front photo
            cand = [i for i, it in enumerate(items) if it[2].any()]
            if len(cand) < min_persons_for_mean:
                cand = list(range(len(items)))
            if len(cand) > mean_face_max_persons:
                pick = np.linspace(0, len(cand) - 1, mean_face_max_persons).round().astype(int)
                cand = [cand[j] for j in pick]
            fits1 = _run_fits([items[i] for i in cand], mean0, cfg, pool, used_workers)
            good = [j for j, f in enumerate(fits1) if f.converged and not f.front_ignored]
            if len(good) >= min_persons_for_mean:
                # each shape in its front photo's frame: the population's pitch zero is
                # "ID photos are frontal on average", whatever mean0 says
                shapes = [_shape_in_front_frame(fits1[j], items[cand[j]][2]) for j in good]
                mean = mean_face_from_fits(shapes, mean0)
                mean_persons, refined = len(good), True
                for j in good:  # warm start for pass 2
                    a, b, c, _ = items[cand[j]]
                    items[cand[j]] = (a, b, c, fits1[j])
        fits = _run_fits(items, mean, cfg, pool, used_workers)
    if isinstance(pool, RayTasks):
        print(f"pose: Ray tasks ran on node(s) {pool.where()}", flush=True)

    not_conv = []
    for p, fit in zip(bundle_names, fits, strict=True):
        bad, clear = _contradicted(fit.poses, lm[groups[p]]) if fit.converged else (0, 0)
        if fit.converged and 2 * bad <= clear:
            poses[groups[p]] = fit.poses
        elif fit.converged:  # the 2D evidence says the fit is mirrored: single-image estimates
            generic_names.append(p)
            reasons[p] = (
                f"bundle adjustment's yaw contradicted the nose's side in {bad} of {clear} "
                "clearly turned images"
            )
        else:  # keep it in the generic group, with the reason
            not_conv.append(p)
            generic_names.append(p)
            why = f" ({fit.error})" if fit.error else ""
            reasons[p] = f"bundle adjustment did not converge{why}"

    bias = np.zeros(3)
    kept = [p for p in bundle_names if p not in reasons]
    if len(kept) >= min_persons_for_mean:
        # calibrate the generic estimator against the bundle-adjusted persons (always, so the
        # report shows it; cheap: at most 4000 single-image PnPs); too few persons: no bias
        idx = np.concatenate([groups[p] for p in kept])
        if idx.size > 4000:
            idx = np.random.default_rng(0).choice(idx, 4000, replace=False)
        gen = estimate_poses_generic(lm[idx], sz[idx], template=mean)
        diff = poses[idx] - gen
        diff[:, 0] = (diff[:, 0] + 180.0) % 360.0 - 180.0
        diff[:, 2] = (diff[:, 2] + 180.0) % 360.0 - 180.0
        bias = np.median(diff, axis=0)
    contradicted = {}
    single = PhotoPoseModel(mean, (float(bias[0]), float(bias[1]), float(bias[2])))
    for p in generic_names:
        idx = groups[p]
        try:  # the single-image estimate generate gives a photo (checkpoints carry `single`)
            poses[idx] = single.estimate_many(lm[idx], sz[idx])
        except PoseFitError as exc:
            where = labels[idx[exc.index]] if labels is not None else f"image {idx[exc.index]}"
            raise PoseFitError(idx[exc.index], f"person {p!r}, {where}: {exc.reason}") from exc
    for p, idx in groups.items():
        bad, clear = _contradicted(poses[idx], lm[idx])
        if bad:
            contradicted[p] = f"{bad} of {clear} clearly turned images"

    rms = np.array([f.rms_px for f in fits if f.converged])
    elapsed = time.perf_counter() - t_start
    report = PoseReport(
        n_images=n,
        n_persons=len(groups),
        n_bundle_persons=len(kept),
        n_generic_persons=len(generic_names),
        generic_persons=sorted(generic_names),
        generic_reasons=reasons,
        n_not_converged=len(not_conv),
        n_front_photos_ignored=int(sum(f.front_ignored for f in fits)),
        not_converged_persons=not_conv,
        yaw_contradicted=contradicted,
        median_rms_px=float(np.median(rms)) if rms.size else float("nan"),
        p90_rms_px=float(np.percentile(rms, 90)) if rms.size else float("nan"),
        min_images=int(min_images),
        mean_face_refined=refined,
        mean_face_persons=mean_persons,
        mean_face=mean.round(3).tolist(),
        generic_bias_deg=[float(b) for b in bias],
        seconds=elapsed,
        ms_per_person=1000.0 * elapsed / max(1, len(groups)),
        num_workers=used_workers,
    )
    return poses.astype(np.float32), report
