"""Head pose (yaw, pitch, roll) from the legacy data's five 2D landmarks.

The legacy extraction script gives, per image, five landmarks (image-left eye, image-right eye,
nose tip, image-left mouth corner, image-right mouth corner, InsightFace order) and the image
size; its pose values are unusable.  Angles and camera follow :mod:`controlnet_ray.data.geometry`
(focal length = image width, principal point at the centre, ``cam = FLIP @ R @ p + t``).

Three estimators, from worst to best:

* :func:`legacy_epnp_pose` -- the original's EPnP on ``LEGACY_TEMPLATE_3D`` (comparison only).
* :func:`estimate_pose_generic` -- iterative PnP (SQPnP start, Levenberg-Marquardt refinement)
  with a *mean* face.  A single image cannot separate a person's geometry from their pose, so
  this is off by the person's deviation from the mean face (and biased when the mean is wrong).
* :func:`fit_person` -- a small bundle adjustment: one person's 5-point 3D shape jointly with
  the poses of all their images (``scipy.optimize.least_squares``, Rodrigues vectors, analytic
  Jacobian, soft-L1 loss on the landmark residuals only).  Pose and shape are only defined up to
  a rotation (the gauge); it is fixed by priors, all Gaussian:

  - *mirror symmetry* of the shape (eye and mouth-corner pairs mirror about a vertical plane
    through the nose): fixes yaw and roll of the head frame to a fraction of a degree;
  - *shape prior* around the mean face (centred coordinates, sigma 3.5 mm each at a 63 mm
    inter-ocular distance): the only thing besides the front photos that fixes pitch --
    ``pitch = 0`` means "the face looks like the mean face seen from the front";
  - *front photos* (role ``front``) a few degrees around frontal (sigma 3 deg yaw/pitch, 2 deg
    roll) -- a prior, not a hard ``front = 0`` constraint, since ID photos are a few degrees off.
    A front photo fitted more than 4 sigma off frontal (mislabelled) loses its prior and the
    person is refitted; a person whose images are mostly "front" gets no frontal prior.

  Scale and depth are ambiguous under perspective; the shape prior fixes the scale (the mean
  face's), which leaves the angles untouched.

:func:`estimate_dataset_poses` runs the whole legacy dataset: pass 1 bundle-adjusts up to 150
persons around :data:`MEAN_FACE_3D`; the dataset's own mean face is the median of those shapes,
each expressed in its person's *front-photo* frame (so the population's pitch zero is "ID photos
are frontal on average", which no longer depends on the guessed mean face); pass 2 fits
everyone around that mean.  Persons with too few images get the generic estimate with the
dataset mean face, corrected by the median (bundle - generic) offset measured on the
bundle-adjusted persons; the report lists them.

The solver is a variable projection: ``least_squares`` sees only the 12 shape parameters and
the per-image poses are solved inside, vectorised over the images (see :class:`_Bundle`);
about 20-35 ms of CPU per person of 25 images, both passes included.

Modules: ``mean_face`` (landmark indices, :data:`MEAN_FACE_3D`), ``validation`` (input checks),
``rotations`` (vectorised rotations and projection), ``single_image`` (EPnP, generic PnP),
``bundle`` (:func:`fit_person`), ``dataset`` (:func:`estimate_dataset_poses`), ``photo``
(:class:`PhotoPoseModel`: a photo's pose as the dataset's single-image estimates, which
checkpoints carry for ``generate``), ``evidence`` (the nose's side). The synthetic
5-point test set lives in ``tests/landmark_sets.py`` (tests and ``benchmarks/pose_accuracy.py``).
"""

from controlnet_ray.data.pose.bundle import BundleConfig, PersonFit, fit_person
from controlnet_ray.data.pose.dataset import PoseReport, estimate_dataset_poses, mean_face_from_fits
from controlnet_ray.data.pose.mean_face import MEAN_FACE_3D
from controlnet_ray.data.pose.photo import PhotoPoseModel
from controlnet_ray.data.pose.single_image import (
    PoseFitError,
    estimate_pose_generic,
    estimate_poses_generic,
    fit_template,
    legacy_epnp_pose,
)

__all__ = [
    "MEAN_FACE_3D",
    "BundleConfig",
    "PersonFit",
    "PhotoPoseModel",
    "PoseFitError",
    "PoseReport",
    "estimate_dataset_poses",
    "estimate_pose_generic",
    "estimate_poses_generic",
    "fit_person",
    "fit_template",
    "legacy_epnp_pose",
    "mean_face_from_fits",
]
