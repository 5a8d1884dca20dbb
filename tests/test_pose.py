"""Tests of controlnet_ray.data.pose (5-point head pose: generic PnP, bundle adjustment)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from controlnet_ray.data import pose as P  # noqa: E402
from controlnet_ray.data.geometry import (  # noqa: E402
    LEGACY_TEMPLATE_3D,
    head_to_camera,
    project,
    rotation_from_ypr,
    ypr_from_rotation,
)
from controlnet_ray.data.pools import pool_workers  # noqa: E402
from controlnet_ray.data.pose import rotations  # noqa: E402
from tests.inference_fixtures import needs_dlib  # noqa: E402
from tests.landmark_sets import pose_errors, synthesize_landmark_set  # noqa: E402

MAX_YAW = 70.0


def _landmarks(shape, ypr, width=224, height=224, dist=220.0, offset=(0.0, 0.0)):
    """Exact landmarks of ``shape`` seen at pose ``ypr`` (via geometry.project)."""
    t = np.array([offset[0], offset[1], dist])
    return project(head_to_camera(shape, rotation_from_ypr(*ypr), t), width, height)


def _errors(pred, ds):
    keep = np.abs(ds.poses[:, 0]) <= MAX_YAW
    return pose_errors(pred, ds.poses)[keep]


def _assert_targets(err, med=2.0, p90=5.0):
    medians, p90s = np.median(err, axis=0), np.percentile(err, 90, axis=0)
    assert np.all(medians <= med), f"median abs error (yaw, pitch, roll) {medians.round(2)} > {med}"
    assert np.all(p90s <= p90), f"p90 abs error (yaw, pitch, roll) {p90s.round(2)} > {p90}"


# ---------------------------------------------------------------- geometry and conventions


def test_geometry_round_trip_through_projection():
    rng = np.random.default_rng(1)
    shape = P.MEAN_FACE_3D
    for _ in range(20):
        ypr = rng.uniform([-80, -40, -30], [80, 40, 30])
        rot = rotation_from_ypr(*ypr)
        np.testing.assert_allclose(ypr_from_rotation(rot), ypr, atol=1e-9)
        np.testing.assert_allclose(rotations._ypr_batch(rot[None])[0], ypr, atol=1e-9)
        rvec = rotations._rotvec_from_matrix(rot[None])
        np.testing.assert_allclose(rotations._rodrigues_with_jac(rvec)[0][0], rot, atol=1e-9)
        t = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(150, 400)])
        w, h = 320.0, 400.0
        uv = project(head_to_camera(shape, rot, t), w, h)
        uv_batch = rotations._project_batch(shape, rot[None], t[None], np.array([[w, h]]))[0]
        np.testing.assert_allclose(uv_batch, uv, atol=1e-9)
        # back through the pinhole: the camera-frame points reproject onto the same pixels
        cam = head_to_camera(shape, rot, t)
        ray = np.column_stack([(uv[:, 0] - w / 2) / w, (uv[:, 1] - h / 2) / w, np.ones(5)])
        np.testing.assert_allclose(ray * cam[:, 2:3], cam, atol=1e-9)


def test_generic_pose_exact_when_shape_equals_template():
    rng = np.random.default_rng(2)
    for template in (P.MEAN_FACE_3D, LEGACY_TEMPLATE_3D):
        for _ in range(15):
            ypr = rng.uniform([-70, -30, -20], [70, 30, 20])
            w = float(rng.choice([112, 256, 640]))
            lm = _landmarks(
                template, ypr, w, w, dist=rng.uniform(180, 300), offset=rng.uniform(-10, 10, 2)
            )
            got = P.estimate_pose_generic(lm, w, w, template=template)
            np.testing.assert_allclose(got, ypr, atol=1e-5)
    # the legacy EPnP is exact on its own template too
    ypr = (25.0, -10.0, 7.0)
    lm = _landmarks(LEGACY_TEMPLATE_3D, ypr)
    np.testing.assert_allclose(P.legacy_epnp_pose(lm, 224, 224), ypr, atol=1e-4)


@pytest.mark.parametrize("estimator", ["generic", "legacy", "bundle"])
def test_sign_conventions(estimator):
    face = P.MEAN_FACE_3D

    def estimate(ypr):
        lm = _landmarks(face if estimator != "legacy" else LEGACY_TEMPLATE_3D, ypr)
        if estimator == "generic":
            return lm, P.estimate_pose_generic(lm, 224, 224)
        if estimator == "legacy":
            return lm, P.legacy_epnp_pose(lm, 224, 224)
        # bundle: the same person at several poses around the probe pose
        poses = [(0, 0, 0), ypr, (-40, 10, 5), (40, -10, -5), (20, 25, 10), (-20, -25, -10)]
        lms = np.stack([_landmarks(face, p) for p in poses])
        fit = P.fit_person(lms, np.full((6, 2), 224.0), np.arange(6) == 0)
        assert fit.method == "bundle"
        return lm, tuple(fit.poses[1])

    lm, (yaw, pitch, roll) = estimate((30.0, 0.0, 0.0))  # turned to the image's right
    assert lm[2, 0] > lm[[0, 1], 0].mean() and yaw > 20 and abs(pitch) < 2 and abs(roll) < 2
    lm, (yaw, pitch, roll) = estimate((0.0, 20.0, 0.0))  # nose lifted: nose closer to the eyes
    frontal = _landmarks(face if estimator != "legacy" else LEGACY_TEMPLATE_3D, (0, 0, 0))
    assert (lm[2, 1] - lm[0, 1]) < (frontal[2, 1] - frontal[0, 1]) and pitch > 15 and abs(yaw) < 2
    lm, (yaw, pitch, roll) = estimate((0.0, 0.0, 15.0))  # counter-clockwise in the image
    assert lm[1, 1] < lm[0, 1] and roll > 10 and abs(yaw) < 2 and abs(pitch) < 2
    assert lm[0, 0] < lm[1, 0]  # InsightFace order: image-left eye first


# ---------------------------------------------------------------- bundle adjustment accuracy


def test_bundle_adjustment_meets_targets_on_synthetic_set():
    ds = synthesize_landmark_set(40, 24, seed=3)
    poses, report = P.estimate_dataset_poses(ds.person_names, ds.roles, ds.landmarks_2d, ds.sizes)
    assert poses.dtype == np.float32 and poses.shape == (len(ds.roles), 3)
    assert report.n_bundle_persons == 40 and report.n_generic_persons == 0
    assert report.median_rms_px < 1.0  # ~ the 0.5-1 px landmark noise
    _assert_targets(_errors(poses, ds))
    # and it beats the single-image estimate, whose error is the person's geometry
    generic = _errors(P.estimate_poses_generic(ds.landmarks_2d, ds.sizes), ds)
    assert np.median(_errors(poses, ds)[:, 0]) < np.median(generic[:, 0])


def test_bundle_adjustment_recovers_from_a_wrong_mean_face():
    """True population = the legacy template (very unlike MEAN_FACE_3D): the dataset pass
    re-estimates the mean face, and the generic fallback uses it plus the measured bias."""
    ds = synthesize_landmark_set(40, 24, seed=4, population_mean=LEGACY_TEMPLATE_3D)
    names = list(ds.person_names)
    few = ds.person_index >= 36  # the last 4 persons keep only 3 images each
    keep = ~few | (np.arange(len(names)) - np.searchsorted(ds.person_index, ds.person_index) < 3)
    idx = np.flatnonzero(keep)
    poses, report = P.estimate_dataset_poses(
        [names[i] for i in idx], [ds.roles[i] for i in idx], ds.landmarks_2d[idx], ds.sizes[idx]
    )
    assert report.mean_face_refined and report.n_generic_persons == 4
    err = pose_errors(poses, ds.poses[idx])
    ba = err[~few[idx] & (np.abs(ds.poses[idx, 0]) <= MAX_YAW)]
    _assert_targets(ba)
    # fallback persons: the legacy-template pitch bias (~30 deg with the default mean face) is gone
    fb = err[few[idx]]
    naive = pose_errors(
        P.estimate_poses_generic(ds.landmarks_2d[idx][few[idx]], ds.sizes[idx][few[idx]]),
        ds.poses[idx][few[idx]],
    )
    assert np.median(fb[:, 1]) < 6.0 < np.median(naive[:, 1])


def test_fallback_recorded_for_person_with_too_few_images():
    ds = synthesize_landmark_set(6, 8, seed=5)
    names = list(ds.person_names)
    drop = np.flatnonzero(ds.person_index == 2)[3:]  # person_00002 keeps 3 images
    idx = np.setdiff1d(np.arange(len(names)), drop)
    poses, report = P.estimate_dataset_poses(
        [names[i] for i in idx],
        [ds.roles[i] for i in idx],
        ds.landmarks_2d[idx],
        ds.sizes[idx],
        min_images=4,
    )
    assert report.generic_persons == ["person_00002"]
    assert report.n_generic_persons == 1 and report.n_bundle_persons == 5
    assert "3 image(s) < min_images=4" in report.generic_reasons["person_00002"]
    assert np.all(np.isfinite(poses))
    d = report.to_dict()
    json.dumps(d)  # JSON-able
    assert d["generic_persons"] == ["person_00002"] and d["min_images"] == 4
    # fit_person itself falls back below min_images
    m = ds.person_index == 0
    fit = P.fit_person(ds.landmarks_2d[m][:3], ds.sizes[m][:3], np.array([True, False, False]))
    assert fit.method == "generic" and fit.poses.shape == (3, 3)
    fit = P.fit_person(ds.landmarks_2d[m], ds.sizes[m], np.arange(m.sum()) == 0)
    assert fit.method == "bundle" and fit.converged and fit.shape.shape == (5, 3)
    assert fit.translations.shape == (m.sum(), 3) and fit.rms_px < 2.0


def test_process_pool_matches_single_process():
    ds = synthesize_landmark_set(6, 6, seed=6)
    args = (ds.person_names, ds.roles, ds.landmarks_2d, ds.sizes)
    one, rep1 = P.estimate_dataset_poses(*args, num_workers=1)
    two, rep2 = P.estimate_dataset_poses(*args, num_workers=2)
    np.testing.assert_allclose(one, two, atol=1e-4)
    assert rep2.num_workers == pool_workers(2)  # 2 where the process may use two CPUs


# ---------------------------------------------------------------- input validation


def test_rejects_bad_inputs_with_the_field_name():
    lm = _landmarks(P.MEAN_FACE_3D, (10, 0, 0))
    bad = lm.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="landmarks_2d.*NaN"):
        P.estimate_pose_generic(bad, 224, 224)
    with pytest.raises(ValueError, match=r"landmarks_2d must have shape \[5, 2\]"):
        P.estimate_pose_generic(lm[:4], 224, 224)
    with pytest.raises(ValueError, match="width/height"):
        P.estimate_pose_generic(lm, -1, 224)
    with pytest.raises(ValueError, match="landmarks_2d.*NaN"):
        P.legacy_epnp_pose(bad, 224, 224)

    lms = np.stack([lm] * 5)
    sizes = np.full((5, 2), 224.0)
    front = np.arange(5) == 0
    with pytest.raises(ValueError, match=r"landmarks_2d must have shape \[K, 5, 2\]"):
        P.fit_person(lm, sizes, front)
    with pytest.raises(ValueError, match="sizes"):
        P.fit_person(lms, sizes[:4], front)
    with pytest.raises(ValueError, match="sizes"):
        P.fit_person(lms, np.full((5, 2), np.nan), front)
    with pytest.raises(ValueError, match="front_mask"):
        P.fit_person(lms, sizes, front[:3])
    bad_lms = lms.copy()
    bad_lms[3, 1, 1] = np.inf
    with pytest.raises(ValueError, match="landmarks_2d.*image 3"):
        P.fit_person(bad_lms, sizes, front)

    names, roles = ["a"] * 5, ["front"] + ["video"] * 4
    with pytest.raises(ValueError, match="person_names"):
        P.estimate_dataset_poses(names[:4], roles, lms, sizes)
    with pytest.raises(ValueError, match="roles"):
        P.estimate_dataset_poses(names, roles[:4], lms, sizes)
    with pytest.raises(ValueError, match="landmarks_2d.*NaN"):
        P.estimate_dataset_poses(names, roles, bad_lms, sizes)
    with pytest.raises(ValueError, match="sizes"):
        P.estimate_dataset_poses(names, roles, lms, sizes.T)


def test_mislabelled_front_photo_loses_its_prior():
    ds = synthesize_landmark_set(1, 24, seed=9)
    lm, true = ds.landmarks_2d.copy(), ds.poses.copy()
    true[0] = (40.0, 0.0, 0.0)  # the "front" photo is in fact turned 40 degrees
    rot = rotation_from_ypr(*true[0])
    lm[0] = project(head_to_camera(ds.shapes[0], rot, ds.translations[0]), *ds.sizes[0])
    fit = P.fit_person(lm, ds.sizes, np.arange(25) == 0)
    assert fit.front_ignored == 1
    err = pose_errors(fit.poses, true)
    assert np.all(np.median(err, axis=0) < 2.0) and abs(fit.poses[0, 0] - 40.0) < 3.0
    # images all labelled "front": no frontal prior at all (it would pull every pose to 0)
    fit = P.fit_person(ds.landmarks_2d, ds.sizes, np.ones(25, dtype=bool))
    assert fit.front_ignored == 25
    assert np.all(np.median(pose_errors(fit.poses, ds.poses), axis=0) < 2.0)


# ---------------------------------------------------------------- real faces and 2D evidence


def test_nose_side_evidence_and_contradiction():
    from controlnet_ray.data.pose.evidence import nose_offset, yaw_contradicts

    lm = np.stack([_landmarks(P.MEAN_FACE_3D, (y, 0.0, r)) for y, r in ((30, 0), (-30, 25))])
    off = nose_offset(lm)
    assert off[0] > 0.12 and off[1] < -0.12  # the nose's side, whatever the roll
    assert list(yaw_contradicts([30.0, -30.0], lm)) == [False, False]
    assert list(yaw_contradicts([-30.0, 30.0], lm)) == [True, True]  # mirrored fits
    assert not yaw_contradicts(-3.0, lm[0])  # too small a yaw to judge


def test_the_nose_side_never_contradicts_a_true_yaw_but_in_rare_extreme_views():
    """Calibration: exact projections of the plausibility tests' face templates (several
    proportions, focal lengths 0.5x-3x) over yaw +-90, pitch and roll +-45: the true yaw
    contradicts the nose's side in under 0.2 % of views (along the eye axis alone it was 18 %:
    the eyes' order reverses near profile)."""
    from controlnet_ray.data.pose.evidence import yaw_contradicts
    from tests.test_plausibility import grid, views

    poses = grid(range(-90, 91, 10), range(-45, 46, 15), range(-45, 46, 15))
    faces = [v for v in views(poses, seed=1, noise=0.0) if v.inside()]
    ypr = np.array([v.ypr for v in faces])
    lm = np.stack([v.landmarks for v in faces])
    assert len(faces) > 15000
    assert yaw_contradicts(ypr[:, 0], lm).mean() < 0.002
    # A mirrored fit of a clearly turned face (30-60 deg, pitch and roll within 30) is caught
    # in most views, so a mirrored person (refitted when most of their views disagree) is.
    turned = (np.abs(ypr[:, 0]) >= 30) & (np.abs(ypr[:, 0]) <= 60)
    turned &= np.all(np.abs(ypr[:, 1:]) <= 30, axis=1)
    assert yaw_contradicts(-ypr[:, 0], lm)[turned].mean() > 0.75


@needs_dlib
@pytest.mark.parametrize("landmarks", [5, 68])
def test_real_photo_yaw_follows_the_nose_and_flips_with_the_mirror(landmarks):
    """dlib on scikit-image's astronaut and its mirror image: the fitted yaw has the nose's
    sign, and the mirror flips it (dlib's 5 points once gave the opposite sign); the smiling
    near-frontal portrait gets a near-frontal pitch (dlib's 68 points once gave -51 deg)."""
    from skimage import data

    from controlnet_ray.data import detect
    from controlnet_ray.data.pose.evidence import nose_offset, yaw_contradicts

    det = detect.DlibDetector(landmarks=landmarks)
    photo = np.ascontiguousarray(data.astronaut())
    yaws = []
    for image in (photo, np.ascontiguousarray(photo[:, ::-1])):
        lm = detect.largest_face(det.detect(image)).landmarks
        yaw, pitch, _ = P.estimate_pose_generic(lm, image.shape[1], image.shape[0])
        assert not yaw_contradicts(yaw, lm), (yaw, nose_offset(lm))
        assert abs(pitch) < 15.0, pitch
        yaws.append(yaw)
    assert yaws[0] > 2.0 and yaws[1] < -2.0 and abs(yaws[0] + yaws[1]) < 4.0, yaws


def test_single_image_estimate_prefers_frontal_only_when_the_fits_are_about_equal():
    """A smile (mouth corners 18 mm higher and 6 mm further out) on a frontal mean face: the
    best fit reads the shortened mouth as a steep pitch and fits badly; the pitch-0 fit is
    about as good, so it is taken. A really pitched face, and the same smile on it,
    fit the pitched pose far better than any frontal one and keep their pitch."""
    from controlnet_ray.data.pose.single_image import _generic_rt

    smile = P.MEAN_FACE_3D.copy()
    smile[3:, 1] += 18.0
    smile[3:, 0] += np.array([-6.0, 6.0])
    lm = _landmarks(smile, (8.0, 0.0, 0.0), 512, 512, dist=700.0)
    rot, _ = _generic_rt(lm, 512, 512, P.MEAN_FACE_3D)
    assert abs(ypr_from_rotation(rot)[1]) > 25.0  # the global minimum: a steep pitch
    got = P.estimate_pose_generic(lm, 512, 512)
    assert abs(got[1]) < 1e-6 and abs(got[0] - 8.0) < 4.0, got
    for face in (P.MEAN_FACE_3D, smile):
        lm = _landmarks(face, (8.0, -30.0, 0.0), 512, 512, dist=700.0)
        assert P.estimate_pose_generic(lm, 512, 512)[1] < -20.0


@pytest.mark.parametrize("ypr", [(30, 0, 0), (-30, 0, 0), (20, 15, 10), (-20, -15, -10)])
def test_dlib5_points_of_a_different_face_recover_the_pose(ypr):
    """dlib's 5 points (eye corners, nose base) projected from a face unlike the one posed on
    them (wider eyes, deeper nose base) at a known pose: the converted points' yaw has the right
    sign and roughly the right size."""
    from controlnet_ray.data.detect import DLIB5_FACE_3D, dlib5_to_insightface

    face = DLIB5_FACE_3D * np.array([1.08, 1.0, 1.0]) + np.array([0.0, -2.0, -3.0])
    pts = _landmarks(face, ypr, width=512, height=512, dist=600.0)
    five = dlib5_to_insightface(pts, 512, 512)
    got = np.array(P.estimate_pose_generic(five, 512, 512))
    assert np.sign(got[0]) == np.sign(ypr[0]) and abs(got[0] - ypr[0]) < 8.0, got
    assert np.all(np.abs(got[1:] - np.array(ypr[1:])) < 10.0), got


def test_numeric_failures_name_the_person_and_the_image(monkeypatch):
    from controlnet_ray.data.pose import dataset, single_image

    ds = synthesize_landmark_set(6, 5, seed=3)
    names = list(ds.person_names)
    labels = [f"video/{n}/frame_{i:03d}.jpg" for i, n in enumerate(names)]
    real_fit = dataset.fit_person

    mine = ds.landmarks_2d[ds.person_index == 2]

    def fit(lm, *args, **kwargs):  # person 2's bundle adjustment hits a singular matrix
        if lm.shape == mine.shape and np.allclose(lm, mine):
            raise np.linalg.LinAlgError("Singular matrix")
        return real_fit(lm, *args, **kwargs)

    monkeypatch.setattr(dataset, "fit_person", fit)
    _, report = P.estimate_dataset_poses(names, ds.roles, ds.landmarks_2d, ds.sizes)
    bad = names[int(np.flatnonzero(ds.person_index == 2)[0])]
    assert "Singular matrix" in report.generic_reasons[bad]  # named, then single-image poses
    target = int(np.flatnonzero(ds.person_index == 2)[3])
    real_rt = single_image._generic_rt

    def rt(lm, *args):  # and one image's single-image fit fails too
        if np.allclose(lm, ds.landmarks_2d[target]):
            raise np.linalg.LinAlgError("Singular matrix")
        return real_rt(lm, *args)

    monkeypatch.setattr(single_image, "_generic_rt", rt)
    with pytest.raises(P.PoseFitError, match=rf"person '{bad}', {labels[target]}: .*Singular"):
        P.estimate_dataset_poses(names, ds.roles, ds.landmarks_2d, ds.sizes, labels=labels)


def test_photo_pose_model_round_trips_and_names_a_bad_field():
    """What checkpoints carry: a manifest's pose report in, plain lists out and back; missing
    fields are the defaults; a malformed one is named."""
    report = {
        "mean_face": (P.MEAN_FACE_3D * 1.1).tolist(),
        "generic_bias_deg": [1.0, -2.0, 0.5],
        "summary": {"ranges": {"train": {"yaw": [-60, 61], "pitch": [-20, 25], "roll": [-9, 8]}}},
    }
    model = P.PhotoPoseModel.from_pose_report(report)
    again = P.PhotoPoseModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.bias_deg == (1.0, -2.0, 0.5) and again.trained_range_deg["yaw"] == (-60.0, 61.0)
    np.testing.assert_allclose(again.mean_face, P.MEAN_FACE_3D * 1.1, atol=1e-3)
    lm = _landmarks(P.MEAN_FACE_3D * 1.1, (20.0, 5.0, 0.0))
    want = P.estimate_pose_generic(lm, 224, 224, template=again.mean_face, bias_deg=(1, -2, 0.5))
    np.testing.assert_allclose(again.estimate(lm, 224, 224), want)
    default = P.PhotoPoseModel.from_dict(None)
    assert default.trained_range_deg is None and default.bias_deg == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="pose_estimate.bias_deg"):
        P.PhotoPoseModel.from_dict({"bias_deg": [1.0, 2.0]})
    with pytest.raises(ValueError, match="trained_range_deg.pitch"):
        P.PhotoPoseModel.from_dict({"trained_range_deg": {"yaw": [0, 1], "roll": [0, 1]}})
