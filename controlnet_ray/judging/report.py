"""Judge any predictor's outputs the same way: per-image metrics, summaries, the text report.

The one evaluation module: ``controlnet_ray.evaluate``, the benchmarks and a training loop all
score through :class:`Scorer` and :func:`build_report`, so a figure means the same everywhere.

Per image (pair = source, target, source pose, requested target pose, person):

* ``psnr`` / ``psnr_face``: ``controlnet_ray.metrics.psnr_per_image`` on the whole crop and on the
  face region (bool ``[H, W]`` mask: ``metrics.face_mask`` of the data's framing, given by the
  caller);
* ``pose_err``: ``|judge(output) - requested pose|`` per axis (degrees, wrapped to +-180); the
  ``floor`` row is the judge on the real targets, the error no output can be expected to beat;
* ``id_top1``: identity retrieval. Candidates: for each held-out person, their real frame nearest
  to the requested pose (the pair's own target left out, so the right person's candidate is a
  different frame, like everybody else's); the output's nearest candidate must be the right
  person. Distance: between the identity judge's embeddings (``identity_judge``: trained on
  real crops of the training persons only, never on generated images). Chance is 1 / number
  of held-out persons;
* ``id_top1_pixel``: the same retrieval with a distance that learns nothing: L2 between face
  regions area-downsampled to 16 px and standardised per image (brightness and contrast
  removed, hue kept).  It also matches a video's lighting and background, which no generator
  can know from the ID photo (see ``identity_judge``), so it is reported beside, not instead;
* ``sharpness``: ``metrics.laplacian_energy_per_image`` of the output over the target's, face
  region (1 = as sharp as the real frame; blurs are < 1);
* ``arcface_cos`` (with an ArcFace embedder): cosine of output and target embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from controlnet_ray.data.pairs import MIN_SPLIT_PERSONS
from controlnet_ray.judging.data import AXES, EvalSet, to_uint8
from controlnet_ray.judging.identity_judge import IdentityJudge
from controlnet_ray.judging.pose_judge import PoseJudge
from controlnet_ray.judging.predictors import BEST_CANDIDATES, Predictor
from controlnet_ray.metrics import (
    SHARPNESS_FLOOR,
    laplacian_energy_per_image,
    psnr_per_image,
)

ID_SIZE = 16  # px of the identity descriptor's face region
FLOOR = "floor"  # the row of the real targets
Embedder = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> unit vectors [N, D]


def angle_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|pred - target|`` per axis in degrees, wrapped into ``[0, 180]``."""
    return ((pred.float() - target.float() + 180.0) % 360.0 - 180.0).abs()


def identity_descriptor(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: the face region area-downsampled to 16 px, standardised per image."""
    small = F.interpolate(images.float().clamp(-1, 1), size=(ID_SIZE, ID_SIZE), mode="area")
    m = F.interpolate(mask[None, None].float(), size=(ID_SIZE, ID_SIZE), mode="area")[0, 0] > 0.5
    v = small[:, :, m].flatten(1)
    v = v - v.mean(dim=1, keepdim=True)
    return v / v.std(dim=1, keepdim=True).clamp(min=1e-3)


def _candidates(ev: EvalSet) -> np.ndarray:
    """``[P, K]`` gallery rows: per pair, each held-out person's frame nearest to the requested
    pose (the pair's own target excluded), persons in a fixed order."""
    from controlnet_ray.data.pairs import pose_distance

    g = ev.gallery
    persons = sorted(set(g.person.tolist()))
    dist = pose_distance(ev.target_pose.numpy().astype(np.float64), g.poses.astype(np.float64))
    dist[np.arange(len(ev)), ev.target_row] = np.inf
    out = np.empty((len(ev), len(persons)), np.int64)
    for k, name in enumerate(persons):
        rows = np.flatnonzero(g.person == name)
        out[:, k] = rows[np.argmin(dist[:, rows], axis=1)]
    return out


class Scorer:
    """Scores outputs on one :class:`EvalSet`; everything about the targets is computed once."""

    def __init__(
        self,
        ev: EvalSet,
        judge: PoseJudge,
        mask: torch.Tensor,
        embed: Embedder | None = None,
        batch_size: int = 64,
        identity: IdentityJudge | None = None,
    ) -> None:
        """``identity`` None: ``id_top1`` uses the pixel descriptor (for small unit tests)."""
        self.ev, self.judge, self.embed, self.batch_size = ev, judge, embed, batch_size
        self.identity = identity
        self.mask = mask
        gallery = torch.from_numpy(np.ascontiguousarray(ev.gallery.images)).permute(0, 3, 1, 2)
        gallery = gallery.float() / 127.5 - 1.0
        self.gallery_pixel = identity_descriptor(gallery, self.mask)
        self.gallery_desc = identity(gallery) if identity is not None else self.gallery_pixel
        self.candidates = _candidates(ev)
        persons = ev.gallery.person[self.candidates]  # [P, K] names
        self.right = persons == ev.person[:, None]
        if not self.right.any(axis=1).all():
            raise ValueError("a pair's person has no other frame to be retrieved by")
        self.target_sharpness = laplacian_energy_per_image(ev.target, self.mask)
        self.target_embed = embed(to_uint8(ev.target)) if embed is not None else None
        self.floor = self.score(ev.target)

    @property
    def num_persons(self) -> int:
        return self.candidates.shape[1]

    def predict(self, predict_fn: Predictor, device: torch.device | None = None) -> torch.Tensor:
        """All outputs of ``predict_fn`` (``[P, 3, H, W]`` on the CPU), in batches, no grad."""
        ev, out = self.ev, []
        with torch.no_grad():
            for i in range(0, len(ev), self.batch_size):
                sl = slice(i, i + self.batch_size)
                args = (ev.source[sl], ev.source_pose[sl], ev.target_pose[sl])
                if device is not None:
                    args = tuple(a.to(device) for a in args)
                out.append(predict_fn(*args).detach().float().cpu())
        return torch.cat(out)

    def score(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-image metrics of ``[P, 3, H, W]`` outputs (in pair order)."""
        ev = self.ev
        if outputs.shape != ev.target.shape:
            raise ValueError(f"outputs {tuple(outputs.shape)} != targets {tuple(ev.target.shape)}")
        pixel = identity_descriptor(outputs, self.mask)
        desc = self.identity(outputs) if self.identity is not None else pixel
        sharp = laplacian_energy_per_image(outputs, self.mask)
        per = {
            "psnr": psnr_per_image(outputs, ev.target).numpy(),
            "psnr_face": psnr_per_image(outputs, ev.target, self.mask).numpy(),
            "pose_err": angle_error(self.judge(outputs), ev.target_pose).numpy(),
            "id_top1": self._retrieved(desc, self.gallery_desc),
            "id_top1_pixel": self._retrieved(pixel, self.gallery_pixel),
            "sharpness": (sharp / self.target_sharpness.clamp(min=SHARPNESS_FLOOR)).numpy(),
        }
        if self.embed is not None:
            per["arcface_cos"] = np.sum(self.embed(to_uint8(outputs)) * self.target_embed, axis=1)
        return per

    def _retrieved(self, desc: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
        """[P] bool: the nearest of each pair's candidates is the right person."""
        dist = torch.cdist(desc[:, None], gallery[self.candidates])[:, 0]  # [P, K]
        return self.right[np.arange(len(self.ev)), dist.argmin(dim=1).numpy()]

    def run(
        self, predict_fn: Predictor, device: torch.device | None = None
    ) -> dict[str, np.ndarray]:
        """``score(predict(predict_fn))``."""
        return self.score(self.predict(predict_fn, device))


# ----------------------------------------------------------------------------- summaries


def summarise(per: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Medians and means of one row's per-image metrics (plain floats, JSON-able)."""
    err = np.asarray(per["pose_err"], np.float64).reshape(-1, 3)
    out: dict[str, Any] = {
        "psnr": float(np.mean(per["psnr"])),
        "psnr_median": float(np.median(per["psnr"])),
        "psnr_face": float(np.mean(per["psnr_face"])),
        "psnr_face_median": float(np.median(per["psnr_face"])),
        "pose_err_median_deg": {a: float(np.median(err[:, i])) for i, a in enumerate(AXES)},
        "pose_err_mean_deg": {a: float(np.mean(err[:, i])) for i, a in enumerate(AXES)},
        "id_top1": float(np.mean(per["id_top1"])),
        "id_top1_pixel": float(np.mean(per["id_top1_pixel"])),
        "sharpness_median": float(np.median(per["sharpness"])),
        "sharpness_mean": float(np.mean(per["sharpness"])),
    }
    out["arcface_cos"] = float(np.mean(per["arcface_cos"])) if "arcface_cos" in per else None
    return out


def headline(rows: Mapping[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """The figures the product is judged by, for row ``name`` (the model):

    judged median yaw and pitch error over the floor's (ratio), face-region PSNR margin over the
    best of the pose-bin means (with mirrors, or colour-shifted), identity top-1 beside that of
    copying the source (the strongest trivial identity: a model must beat it, not only chance),
    sharpness.
    """
    row, floor = rows[name], rows[FLOOR]
    best = max(
        (b for b in BEST_CANDIDATES if b in rows), key=lambda b: rows[b]["psnr_face"], default=None
    )

    def ratio(axis: str) -> float:
        return row["pose_err_median_deg"][axis] / max(floor["pose_err_median_deg"][axis], 1e-6)

    return {
        "predictor": name,
        "yaw_err_ratio": ratio("yaw"),
        "pitch_err_ratio": ratio("pitch"),
        "best_trivial": best,
        "face_psnr_margin_db": None if best is None else row["psnr_face"] - rows[best]["psnr_face"],
        "id_top1": row["id_top1"],
        "id_top1_source": rows["source"]["id_top1"] if "source" in rows else None,
        "sharpness": row["sharpness_median"],
    }


def persons_warning(num_persons: int) -> str | None:
    """A line when fewer than ``data.pairs.MIN_SPLIT_PERSONS`` persons are judged, else None.

    A warning, not a refusal: the figures are still the model's on those persons (a user may
    want exactly that), but they say nothing about new faces in general -- with one person the
    identity retrieval is always right -- so the headline says so where it is read.
    """
    if num_persons >= MIN_SPLIT_PERSONS:
        return None
    return (
        f"WARNING: judged on {num_persons} person{'s' * (num_persons != 1)} only (identity "
        f"chance {1 / max(num_persons, 1):.0%}): not a measure of new faces; judge a split with "
        f">= {MIN_SPLIT_PERSONS} persons (more persons, or --split_ratios at training)"
    )


def build_report(
    scorer: Scorer, per_image: Mapping[str, Mapping[str, np.ndarray]], model: str | None = "model"
) -> dict[str, Any]:
    """The JSON-able report: counts, a summary row per predictor (plus the floor), headline
    figures of ``model`` when it is among them, and every per-image value."""
    rows = {FLOOR: summarise(scorer.floor), **{k: summarise(v) for k, v in per_image.items()}}
    rows[FLOOR]["psnr"] = rows[FLOOR]["psnr_face"] = None  # a target against itself
    rows[FLOOR]["psnr_median"] = rows[FLOOR]["psnr_face_median"] = None
    head = headline(rows, model) if model in per_image else None
    if head is not None:
        head["warning"] = persons_warning(scorer.num_persons)
    return {
        "num_pairs": len(scorer.ev),
        "num_persons": scorer.num_persons,
        "chance_id_top1": 1.0 / scorer.num_persons,
        "face_mask_fraction": float(scorer.mask.float().mean()),
        "judge": dict(scorer.judge.info),
        "rows": rows,
        "headline": head,
        "per_image": {
            k: {m: np.asarray(v).tolist() for m, v in per.items()}
            for k, per in {FLOOR: scorer.floor, **per_image}.items()
        },
    }


def evaluate_predictors(
    predictors: Mapping[str, Predictor],
    scorer: Scorer,
    model: str | None = "model",
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Run and score every predictor on the scorer's pairs; :func:`build_report` of them."""
    per = {name: scorer.run(fn, device) for name, fn in predictors.items()}
    return build_report(scorer, per, model)


# ----------------------------------------------------------------------------- text


def _fmt(v: float | None, spec: str) -> str:
    """``format(v, spec)``, or a dash of the same width for a missing value."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def format_report(report: dict[str, Any]) -> str:
    """A compact table: one line per row (floor first), then the headline figures."""
    lines = [
        f"judged on {report['num_pairs']} pairs of {report['num_persons']} held-out persons "
        f"(identity chance {report['chance_id_top1']:.0%}); medians unless noted",
        f"{'predictor':<18}{'PSNR':>7}{'face':>7}{'yaw err':>9}{'pitch':>7}{'roll':>7}"
        f"{'id top1':>9}{'id pix':>8}{'sharp':>7}{'ArcFace':>9}",
    ]
    for name, r in report["rows"].items():
        e = r["pose_err_median_deg"]
        lines.append(
            f"{name:<18}{_fmt(r['psnr'], '7.2f')}{_fmt(r['psnr_face'], '7.2f')}"
            f"{e['yaw']:>9.1f}{e['pitch']:>7.1f}{e['roll']:>7.1f}{r['id_top1']:>9.0%}"
            f"{r['id_top1_pixel']:>8.0%}{r['sharpness_median']:>7.2f}"
            f"{_fmt(r['arcface_cos'], '9.3f')}"
        )
    lines.append(
        "(PSNR columns: mean dB over pairs; floor = the judges on the real targets; id top1: "
        "retrieval by the identity judge, id pix: by face-region pixels)"
    )
    h = report["headline"]
    if h is not None:
        if h.get("warning"):
            lines.append(h["warning"])
        lines.append(
            f"{h['predictor']}: judged median yaw err x{h['yaw_err_ratio']:.2f} of the floor, "
            f"pitch x{h['pitch_err_ratio']:.2f}; face PSNR margin "
            f"{_fmt(h['face_psnr_margin_db'], '+.2f')} dB over {h['best_trivial']}; "
            f"id top-1 {h['id_top1']:.0%}{_beside_source(h)}; sharpness {h['sharpness']:.2f}"
        )
    return "\n".join(lines)


def _beside_source(headline: Mapping[str, Any]) -> str:
    """`` (copying the source 76%)`` when that row was scored, else nothing."""
    src = headline.get("id_top1_source")
    return "" if src is None else f" (copying the source {src:.0%})"


def summary_line(report: dict[str, Any]) -> str:
    """One line for an epoch log, e.g. ``judged yaw err 6.1 (floor 3.2) deg, face +1.4 dB vs
    pose_bin, id top-1 85 %, sharpness 0.41``."""
    h = report["headline"]
    if h is None:
        return "judged: no model row"
    row, floor = report["rows"][h["predictor"]], report["rows"][FLOOR]
    return (
        f"judged yaw err {row['pose_err_median_deg']['yaw']:.1f} "
        f"(floor {floor['pose_err_median_deg']['yaw']:.1f}) pitch "
        f"{row['pose_err_median_deg']['pitch']:.1f} "
        f"(floor {floor['pose_err_median_deg']['pitch']:.1f}) deg, face "
        f"{_fmt(h['face_psnr_margin_db'], '+.2f')} dB vs {h['best_trivial']}, "
        f"id top-1 {h['id_top1']:.0%}{_beside_source(h)}, sharpness {h['sharpness']:.2f}"
    )
