"""Smoke test of benchmarks/quality.py: a tiny synthetic set, a few CPU-seconds of training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "quality.py"


@pytest.mark.parametrize(
    "budget", [["--budget_min", "0.03"], ["--steps", "5"]], ids=["cpu_time", "steps"]
)
def test_quality_benchmark_smoke(tmp_path: Path, budget: list[str]) -> None:
    out = tmp_path / "quality.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--identities",
        "6",
        "--frames",
        "3",
        "--image_size",
        "32",
        *budget,
        "--eval_every",
        "0.5" if budget[0] == "--budget_min" else "2",
        "--base_channels",
        "8",
        "--feature_dim",
        "32",
        "--batch_size",
        "4",
        "--eval_subset",
        "6",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--json",
        str(out),
    ]
    env = dict(os.environ, CONTROLNET_RAY_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "margin over best trivial" in proc.stdout

    res = json.loads(out.read_text())
    assert res["budget_clock"].startswith("CPU")
    if budget[0] == "--steps":  # a step budget ends after exactly that many steps
        assert res["training"]["optimizer_steps"] == 5
        assert res["timing"]["train_budget_steps"] == 5
        assert [p["steps"] for p in res["curve"]] == [2, 4, 5]
        assert res["curve"][-1]["lr"] < res["curve"][0]["lr"]  # the schedule follows the steps
    else:
        assert res["training"]["optimizer_steps"] > 0
        assert res["timing"]["train_clock_s"] >= 0.03 * 60
    psnr = res["final"]["psnr"]
    for name in ("model", "source", "mean", "pose_bin", "pose_bin_colour"):
        for region in ("whole", "face"):
            assert 0.0 < psnr[name][region] < 100.0, (name, region, psnr[name][region])
    for region in ("whole", "face"):
        m = res["final"]["margins"][region]
        best = max(("source", "mean", "pose_bin", "pose_bin_colour"), key=lambda p: psnr[p][region])
        assert m["best_trivial"] == best
        assert abs(m["margin_db"] - (psnr["model"][region] - psnr[best][region])) < 1e-9
    assert res["curve"] and res["curve"][-1]["steps"] == res["training"]["optimizer_steps"]
    assert res["data"]["persons"]["train"] >= 1 and res["data"]["eval_pairs"] >= 1
    assert 0.3 < res["data"]["face_mask_fraction"] < 0.6
    judged = res["judged"]  # the judged report: same held-out pairs, same PSNR function
    assert "JUDGED final model" in proc.stdout and "judged yaw err" in proc.stdout
    assert judged["num_pairs"] == res["data"]["eval_pairs"]
    for name in ("model", "source", "mean", "pose_bin", "pose_bin_colour"):
        assert abs(judged["rows"][name]["psnr_face"] - psnr[name]["face"]) < 1e-3, name


def test_face_mask_and_masked_psnr() -> None:
    import torch

    from controlnet_ray.judging.predictors import pose_bin
    from controlnet_ray.metrics import face_mask, psnr_per_image

    arcface = face_mask(112, "arcface")
    assert arcface[68, 56] and not arcface[2, 2] and not arcface[68, 56 - 40]
    assert arcface[68, 56 - 37] and arcface[68 - 49, 56]
    mask = face_mask(112, "head")  # head framing: centred on the head, above the ArcFace face
    assert mask[51, 56] and mask[51, 56 - 33] and mask[51 - 43, 56] and not mask[51, 56 - 35]
    assert not mask[100, 56] and arcface[100, 56]  # the chin region of a head crop is the neck
    with pytest.raises(ValueError, match="framing"):
        face_mask(112, "square")
    # Error only outside the ellipse: face PSNR is the floor value, whole PSNR finite.
    target = torch.zeros(1, 3, 112, 112)
    pred = target.clone()
    pred[..., ~mask] = 1.0
    assert float(psnr_per_image(pred, target, mask)) == 100.0
    assert float(psnr_per_image(pred, target)) < 100.0
    # Uniform error of 0.1 on [0, 1] (0.2 on [-1, 1]) everywhere: 20 dB on both.
    pred = target + 0.2
    assert abs(float(psnr_per_image(pred, target, mask)) - 20.0) < 1e-3
    assert [pose_bin(-0.5, 9.9), pose_bin(15.0, -10.0)] == [(-1, 0), (1, -1)]


def test_new_persons_are_past_the_training_sets_last_index_and_grouped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """benchmarks/new_persons.py judges only persons the 40-identity training set does not
    hold (the renderer's persons 40..159, whatever their names' quirks), in whole groups."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the script sets on import; undone
    from new_persons import new_person_mask, person_groups

    from controlnet_ray.data.synthetic.views import person_name

    names = np.array([person_name(i, 400) for i in range(400)] * 2, dtype=object)
    keep = new_person_mask(names, 40, 120)
    chosen = set(names[keep])
    assert chosen == {person_name(i, 400) for i in range(40, 160)}
    assert not chosen & {person_name(i, 40) for i in range(40)}  # none of the training set's
    assert new_person_mask(np.array(["合成_0003", "synth 0005"]), 3, 3).all()
    groups = person_groups(sorted(chosen, reverse=True), 6)
    assert len(groups) == 20 and all(len(g) == 6 for g in groups)
    assert sorted(p for g in groups for p in g) == sorted(chosen)
    assert person_groups(["a", "b", "c"], 2) == [["a", "b"]]


def test_new_persons_summary_bins_identity_by_yaw_and_by_pose_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The summary's identity: averaged over groups (with its standard error), and per pair
    binned by the target's |yaw| and by the pair's largest pose change (yaw, pitch or roll)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    from types import SimpleNamespace

    import torch
    from new_persons import summarise

    def group(source: list[list[float]], target: list[list[float]]) -> SimpleNamespace:
        ev = SimpleNamespace(source_pose=torch.tensor(source), target_pose=torch.tensor(target))
        return SimpleNamespace(ev=ev)

    front = [0.0, 0.0, 0.0]
    groups = [  # pose changes 10 (pitch), 50 (yaw); then 30 (yaw), 25 (roll, target at yaw 5)
        group([front, front], [[0.0, 10.0, 0.0], [-50.0, 0.0, 0.0]]),
        group([front, [0.0, 0.0, -20.0]], [[30.0, 0.0, 0.0], [5.0, 0.0, 5.0]]),
    ]

    def scores(top1: list[bool]) -> dict[str, np.ndarray]:
        n = len(top1)
        return {"id_top1": np.array(top1), "pose_err": np.ones((n, 3)),
                "psnr_face": np.ones(n), "sharpness": np.ones(n)}  # fmt: skip

    s = summarise([scores([True, False]), scores([True, True])], groups)
    assert s["id_top1"] == 0.75 and abs(s["id_top1_se"] - 0.25) < 1e-12  # groups 0.5 and 1.0
    assert s["id_top1_by_pose_change"] == {"0-20": 1.0, "20-40": 1.0, "40-181": 0.0}
    assert s["id_top1_by_abs_yaw"]["0-20"] == 1.0 and s["id_top1_by_abs_yaw"]["40-60"] == 0.0
    assert s["pairs"] == 4


def test_identity_ceiling_renders_the_same_frames_under_the_photos_conditions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """benchmarks/identity_ceiling.py: a variant frame is the real one's person, pose and
    landmarks (the same draws from the noise stream, so every later frame's landmarks and crop
    match too) under the ID photo's conditions; the ID photo itself is left as it is."""
    from controlnet_ray.data.synthetic import dataset
    from controlnet_ray.data.synthetic.identity import make_identity
    from controlnet_ray.data.synthetic.views import front_view, identity_rngs, video_views

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the script sets on import; undone
    monkeypatch.setattr(dataset, "render_view", dataset.render_view)  # the import patches it
    import identity_ceiling

    def render(variant: str | None) -> list[tuple[np.ndarray, ...]]:
        if variant is None:
            monkeypatch.delenv(identity_ceiling._ENV, raising=False)
        else:
            monkeypatch.setenv(identity_ceiling._ENV, variant)
        id_rng, view_rng, noise_rng = identity_rngs(0, 3)
        person = make_identity(id_rng)
        views = [front_view(view_rng), *video_views(view_rng, 3)]
        return [dataset.render_view(person, view, 48, noise_rng) for view in views]

    real = render(None)
    for variant in identity_ceiling.VARIANTS:
        for k, (was, now) in enumerate(zip(real, render(variant), strict=True)):
            np.testing.assert_array_equal(was[1], now[1])  # landmarks
            np.testing.assert_array_equal(was[2], now[2])  # head box
            assert np.array_equal(was[0], now[0]) == (k == 0)  # only the frames re-rendered
