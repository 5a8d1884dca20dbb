"""Agreement of pose labels with independent references, per person and overall.

A wrong sign convention or a depth-inverted fit shows as a negative correlation and as turned
faces labelled with the opposite sign.  Correlation alone is not enough on talking heads: a
person who barely turns has a correlation made of noise, so every row also counts, among the
frames the reference calls clearly turned, those whose label has the reference's sign.  A
person's labels have the *right sign* when more than half of those frames agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: Correlation with the independent estimator that the labels should reach.
TARGET_CORRELATION = 0.8
#: Frames with fewer than this many values give no correlation.
MIN_FRAMES_FOR_CORRELATION = 3


@dataclass(frozen=True)
class Agreement:
    """Labels against one reference: Pearson r, and the sign among clearly turned frames."""

    frames: int
    correlation: float  # nan: too few frames or no spread
    turned: int  # frames whose reference is clearly turned
    same_sign: int  # of those, labelled with the reference's sign

    @property
    def right_sign(self) -> bool | None:
        """More than half of the clearly turned frames agree; None without such frames."""
        return None if self.turned == 0 else 2 * self.same_sign > self.turned


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r, or nan when there are too few values or one side does not vary."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < MIN_FRAMES_FOR_CORRELATION or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def agreement(labels: np.ndarray, reference: np.ndarray, clear: float) -> Agreement:
    """``labels`` against ``reference`` (same frames); turned: ``abs(reference) >= clear``."""
    labels, reference = np.asarray(labels, np.float64), np.asarray(reference, np.float64)
    if labels.shape != reference.shape:
        raise ValueError(f"labels {labels.shape} and reference {reference.shape} differ")
    turned = np.abs(reference) >= clear
    same = turned & (labels * reference > 0)
    return Agreement(
        labels.size, correlation(labels, reference), int(turned.sum()), int(same.sum())
    )


@dataclass(frozen=True)
class PersonRow:
    """One person's (or, with person ``all``, every frame's) figures."""

    person: str
    frames: int
    yaw_label: float  # medians, degrees
    yaw_pnp: float
    pitch_label: float
    pitch_pnp: float
    pnp: Agreement  # yaw labels against the 68-point PnP yaw
    nose: Agreement  # yaw labels against the nose's side


def person_rows(
    names: Sequence[str],
    labels: np.ndarray,
    pnp: np.ndarray,
    nose: np.ndarray,
    clear_yaw: float,
    clear_nose: float,
) -> list[PersonRow]:
    """One row per person (sorted by name) and a last row ``all`` over every frame.

    ``labels`` and ``pnp`` are [N, 3] (yaw, pitch, roll) degrees, ``nose`` [N] nose offsets.
    """
    names_arr = np.asarray(names)
    labels, pnp, nose = (np.asarray(x, np.float64) for x in (labels, pnp, nose))
    groups = [(p, names_arr == p) for p in sorted(set(names_arr.tolist()))]
    groups.append(("all", np.ones(names_arr.size, bool)))
    return [
        PersonRow(
            person,
            int(sel.sum()),
            float(np.median(labels[sel, 0])),
            float(np.median(pnp[sel, 0])),
            float(np.median(labels[sel, 1])),
            float(np.median(pnp[sel, 1])),
            agreement(labels[sel, 0], pnp[sel, 0], clear_yaw),
            agreement(labels[sel, 0], nose[sel], clear_nose),
        )
        for person, sel in groups
    ]


def _r(value: float) -> str:
    return "    -" if np.isnan(value) else f"{value:+.2f}"


def _sign(a: Agreement) -> str:
    return "   -" if a.turned == 0 else f"{a.same_sign:>3d}/{a.turned:<3d}"


def format_table(rows: Sequence[PersonRow]) -> str:
    """The per-person table, then the targets' verdicts (``rows[-1]`` is the ``all`` row)."""
    head = (
        f"{'person':8s} {'n':>4s}  {'yaw label':>9s} {'68-PnP':>7s}  {'r PnP':>5s} "
        f"{'sign PnP':>8s}  {'r nose':>6s} {'sign nose':>9s}  {'pitch label':>11s} {'68-PnP':>7s}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.person:8s} {r.frames:>4d}  {r.yaw_label:>+9.1f} {r.yaw_pnp:>+7.1f}  "
            f"{_r(r.pnp.correlation):>5s} {_sign(r.pnp):>8s}  {_r(r.nose.correlation):>6s} "
            f"{_sign(r.nose):>9s}  {r.pitch_label:>+11.1f} {r.pitch_pnp:>+7.1f}"
        )
    return "\n".join(lines + [verdict(rows)])


def verdict(rows: Sequence[PersonRow]) -> str:
    """The targets: r >= 0.8 with the 68-point PnP overall, the right sign for every person."""
    persons, overall = rows[:-1], rows[-1]
    wrong = [r.person for r in persons if r.pnp.right_sign is False]
    unchecked = sum(r.pnp.right_sign is None for r in persons)
    met = overall.pnp.correlation >= TARGET_CORRELATION
    positive = sum(r.pnp.correlation > 0 for r in persons)
    return (
        f"yaw labels vs 68-point PnP: r {_r(overall.pnp.correlation)} over {overall.frames} "
        f"frames (target >= {TARGET_CORRELATION}: {'met' if met else 'MISSED'}); right sign for "
        f"{len(persons) - len(wrong) - unchecked} of {len(persons)} persons"
        + (f" ({unchecked} never clearly turned)" if unchecked else "")
        + (f"; WRONG sign: {', '.join(wrong)}" if wrong else "")
        + f"; r > 0 for {positive} of {len(persons)} persons"
    )


def rows_to_json(rows: Sequence[PersonRow]) -> list[dict]:
    """Plain dictionaries (nan as None) for ``--json``."""

    def clean(value: object) -> object:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and np.isnan(value) else value

    return [clean(asdict(r)) for r in rows]
