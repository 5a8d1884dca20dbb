"""Pose accuracy of the three 5-point estimators on the synthetic landmark set.

    python benchmarks/pose_accuracy.py                      # 200 persons x 25 images, seed 0
    python benchmarks/pose_accuracy.py --population-mean legacy --persons 100

Prints, per method and axis, the median and 90th percentile absolute error (degrees, images
with |true yaw| <= --max-yaw) and the cost per person (wall and CPU milliseconds, one process).
Methods: the original's EPnP on the legacy template, generic iterative PnP with the legacy
template and with the default mean face, generic PnP with the dataset's mean face and measured
bias (what persons with too few images get), and the per-person bundle adjustment
(``estimate_dataset_poses``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from controlnet_ray.data.geometry import LEGACY_TEMPLATE_3D  # noqa: E402
from controlnet_ray.data.pose import (  # noqa: E402
    MEAN_FACE_3D,
    estimate_dataset_poses,
    estimate_poses_generic,
    legacy_epnp_pose,
)
from tests.landmark_sets import pose_errors, synthesize_landmark_set  # noqa: E402


def _population(name: str) -> np.ndarray:
    if name == "default":
        return MEAN_FACE_3D
    if name == "legacy":  # the legacy template as the true population mean (extreme mismatch)
        return LEGACY_TEMPLATE_3D
    if name == "deep":  # 30 % deeper faces, mouth 6 mm lower than the default mean face
        deep = MEAN_FACE_3D.copy()
        deep[:, 2] *= 1.3
        deep[[3, 4], 1] -= 6.0
        return deep
    raise SystemExit(f"unknown --population-mean {name!r}")


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--persons", type=int, default=200)
    ap.add_argument(
        "--frames", type=int, default=24, help="video frames per person (+1 front photo)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-yaw", type=float, default=70.0)
    ap.add_argument("--population-mean", default="default", choices=("default", "legacy", "deep"))
    ap.add_argument("--workers", type=int, default=1, help="process pool for the bundle adjustment")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    ds = synthesize_landmark_set(
        args.persons, args.frames, args.seed, population_mean=_population(args.population_mean)
    )
    n_img, n_per = len(ds.roles), args.persons
    keep = np.abs(ds.poses[:, 0]) <= args.max_yaw
    print(
        f"synthetic set: {n_per} persons x {args.frames + 1} images = {n_img} images, "
        f"seed {args.seed}, population mean {args.population_mean!r}; errors over "
        f"{int(keep.sum())} images with |yaw| <= {args.max_yaw:g} deg"
    )

    rows = []

    def add(name, pred, wall, cpu):
        err = pose_errors(pred, ds.poses)[keep]
        rows.append(
            {
                "method": name,
                "median": np.median(err, axis=0).round(2).tolist(),
                "p90": np.percentile(err, 90, axis=0).round(2).tolist(),
                "ms_per_person_wall": round(1000.0 * wall / n_per, 2),
                "ms_per_person_cpu": round(1000.0 * cpu / n_per, 2),
            }
        )

    legacy, wall, cpu = _timed(
        lambda: np.array([legacy_epnp_pose(ds.landmarks_2d[i], *ds.sizes[i]) for i in range(n_img)])
    )
    add("legacy EPnP (legacy template)", legacy, wall, cpu)
    legacy_it, wall, cpu = _timed(
        lambda: estimate_poses_generic(ds.landmarks_2d, ds.sizes, template=LEGACY_TEMPLATE_3D)
    )
    add("generic iterative PnP (legacy template)", legacy_it, wall, cpu)
    generic, wall, cpu = _timed(lambda: estimate_poses_generic(ds.landmarks_2d, ds.sizes))
    add("generic iterative PnP (mean face)", generic, wall, cpu)
    (poses, report), wall, cpu = _timed(
        lambda: estimate_dataset_poses(
            ds.person_names, ds.roles, ds.landmarks_2d, ds.sizes, num_workers=args.workers
        )
    )
    fallback, fwall, fcpu = _timed(
        lambda: estimate_poses_generic(
            ds.landmarks_2d,
            ds.sizes,
            template=np.array(report.mean_face),
            bias_deg=report.generic_bias_deg,
        )
    )
    add("generic PnP (dataset mean face + bias)", fallback, fwall, fcpu)
    add("bundle adjustment (per person)", poses, wall, cpu)
    if args.workers > 1:
        rows[-1]["workers"] = args.workers

    head = "| method | yaw med / p90 | pitch med / p90 | roll med / p90 | ms/person (wall, CPU) |"
    print()
    print(head)
    print("|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{m:.2f} / {p:.2f}" for m, p in zip(r["median"], r["p90"], strict=True))
        cost = f"{r['ms_per_person_wall']:.1f}, {r['ms_per_person_cpu']:.1f}"
        print(f"| {r['method']} | {cells} | {cost} |")
    rep = report.to_dict()
    print()
    print(
        f"bundle-adjusted persons {rep['n_bundle_persons']}, "
        f"generic fallback {rep['n_generic_persons']}, not converged {rep['n_not_converged']}, "
        f"median RMS reprojection {rep['median_rms_px']:.2f} px, "
        f"dataset mean face refined: {rep['mean_face_refined']}, generic bias (deg) "
        f"{np.round(rep['generic_bias_deg'], 2).tolist()}"
    )
    out = {
        "args": vars(args),
        "rows": rows,
        "report": {k: v for k, v in rep.items() if k != "generic_reasons"},
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
