"""TrainEngine / evaluate / schedule tests with a tiny stand-in model that follows the contract.

The stand-in has no BatchNorm or dropout, so a bs-8 batch and two bs-4 micro-batches give
the same gradients and the accumulation test can be exact up to float error.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from controlnet_ray import engine as eng
from controlnet_ray.config import ModelConfig, OptimConfig
from tests.ddp_helpers import run_ranks

SCALE = 90.0
CPU = torch.device("cpu")
FP32 = eng.resolve_amp(False, CPU)
REPO = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """Contract stand-in: image from source + target pose, pose head, optional identity."""

    def __init__(self, identity: bool = False) -> None:
        super().__init__()
        self.generator = nn.Conv2d(6, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.pose_head = nn.Linear(3, 3)
        self.identity = identity
        self.autocast_seen: list[bool] = []

    def _pose(self, image: torch.Tensor) -> torch.Tensor:
        return self.pose_head(image.mean(dim=(2, 3)))

    def forward(self, source, source_pose, target_pose, target=None):  # noqa: ANN001
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        b, _, h, w = source.shape
        planes = (target_pose / SCALE).view(b, 3, 1, 1).expand(b, 3, h, w)
        image = torch.tanh(self.norm(self.generator(torch.cat([source, planes], dim=1))))
        cos = None
        if self.identity and target is not None:
            cos = F.cosine_similarity(image.flatten(1).float(), target.flatten(1), dim=1)
        return SimpleNamespace(
            image=image,
            pose_pred=self._pose(image),
            pose_pred_real=self._pose(target) if target is not None else None,
            identity_cos=cos,
        )


def make_batch(b: int = 8, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "source": torch.rand(b, 3, size, size, generator=g) * 2 - 1,
        "target": torch.rand(b, 3, size, size, generator=g) * 2 - 1,
        "source_pose": (torch.rand(b, 3, generator=g) - 0.5) * 120,
        "target_pose": (torch.rand(b, 3, generator=g) - 0.5) * 120,
    }


def split(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    chunks = {k: v.chunk(n) for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(n)]


def nan_batch(b: int = 4) -> dict[str, torch.Tensor]:
    batch = make_batch(b, seed=99)
    batch["source"][0, 0, 0, 0] = float("nan")
    return batch


def make_engine(
    cfg: OptimConfig,
    optim: str = "adamw",
    model: nn.Module | None = None,
    amp: eng.AmpSettings = FP32,
    steps_per_epoch: int = 10,
) -> eng.TrainEngine:
    torch.manual_seed(0)
    model = model if model is not None else TinyNet()
    if optim == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    else:
        opt = eng.build_optimizer(model, cfg)
    sched = eng.build_scheduler(opt, cfg, steps_per_epoch)
    return eng.TrainEngine(model, opt, sched, cfg, CPU, amp, pose_scale=SCALE)


def record_grads(engine: eng.TrainEngine) -> list[list[torch.Tensor]]:
    """Grads as the optimizer sees them at each step (after unscale, rescale and clipping)."""
    seen: list[list[torch.Tensor]] = []

    def hook(opt, args, kwargs):  # noqa: ANN001
        seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])

    engine.optimizer.register_step_pre_hook(hook)
    return seen


def params(engine: eng.TrainEngine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.model.parameters()]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- AMP


def test_resolve_amp_off_and_cpu() -> None:
    assert FP32.enabled is False and FP32.use_scaler is False and "off" in FP32.description
    amp = eng.resolve_amp(True, CPU)
    assert (amp.enabled, amp.dtype, amp.use_scaler) == (True, torch.bfloat16, False)
    assert amp.description == "AMP: bfloat16 autocast on cpu (no GradScaler)"


def test_resolve_amp_cuda_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    amp = eng.resolve_amp(True, torch.device("cuda"))
    assert (amp.dtype, amp.use_scaler) == (torch.bfloat16, False)
    assert amp.description == "AMP: bfloat16 autocast on cuda (no GradScaler)"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    amp = eng.resolve_amp(True, torch.device("cuda"))
    assert (amp.dtype, amp.use_scaler) == (torch.float16, True)


def test_bf16_autocast_step_on_cpu_is_finite() -> None:
    engine = make_engine(OptimConfig(), amp=eng.resolve_amp(True, CPU))
    before = params(engine)
    m = engine.train_micro_batch(make_batch(4))
    assert engine.model.autocast_seen == [True]
    assert math.isfinite(m.loss) and m.optimizer_step and not m.skipped
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, params(engine), strict=True))


# --------------------------------------------------------------------------- optimiser


def test_build_optimizer_trainable_only_and_no_decay_on_1d() -> None:
    model = TinyNet()
    model.pose_head.requires_grad_(False)
    opt = eng.build_optimizer(model, OptimConfig(weight_decay=0.05))
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert groups[0.05] == {id(model.generator.weight)}
    assert groups[0.0] == {id(model.generator.bias), id(model.norm.weight), id(model.norm.bias)}
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        eng.build_optimizer(model, OptimConfig())


def test_optimizers_on_cpu_are_not_fused() -> None:
    """The CPU path is unchanged: AdamW with fused=False, the critic's Adam with torch's default."""
    opt = eng.build_optimizer(TinyNet(), OptimConfig())
    assert opt.defaults["fused"] is False
    disc = eng.build_disc_optimizer(nn.Linear(2, 2), OptimConfig())
    assert not disc.defaults.get("fused")


def test_fused_is_chosen_only_when_every_parameter_is_on_cuda() -> None:
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert eng.use_fused([cuda, cuda])
    assert eng.use_fused(["cuda:0", "cuda:1"])
    assert not eng.use_fused([torch.device("cpu")])
    assert not eng.use_fused([cuda, torch.device("cpu")])
    assert not eng.use_fused([torch.device("meta")])
    assert not eng.use_fused([])


def test_a_capped_peak_lr_is_a_parameter_group_at_the_scaled_rate() -> None:
    """cap_peak_lr's scaled steps equal AdamW with that part in a group at lr x cap/peak,
    through a schedule, and leave the optimizer's state_dict as without the cap."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    a2, b2 = (copy.deepcopy(m) for m in (a, b))
    peak, cap = 2e-3, 1e-4
    capped = torch.optim.AdamW([*a.parameters(), *b.parameters()], lr=peak, weight_decay=0.1)
    assert eng.cap_peak_lr(capped, list(b.parameters()), cap, peak)
    grouped = torch.optim.AdamW(
        [{"params": a2.parameters()}, {"params": b2.parameters(), "lr": cap}],
        lr=peak,
        weight_decay=0.1,
    )
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1 / (1 + i)) for o in (capped, grouped)
    ]
    x = torch.randn(8, 4)
    for _ in range(3):
        for opt, (m1, m2), sched in zip(
            (capped, grouped), ((a, b), (a2, b2)), schedules, strict=True
        ):
            opt.zero_grad()
            m2(torch.tanh(m1(x))).pow(2).sum().backward()
            opt.step()
            sched.step()
    for mine, ref in ((a, a2), (b, b2)):
        for p, q in zip(mine.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert len(capped.state_dict()["param_groups"]) == 1
    assert not eng.cap_peak_lr(capped, list(b.parameters()), cap=1e-2, peak_lr=peak)  # no cap


def test_the_shape_head_learns_at_most_at_its_cap() -> None:
    """At --lr 2e-3 the learned shape head steps at 1e-4 (SHAPE_HEAD_MAX_LR), everything else
    at 2e-3; at the default --lr (1e-4) nothing is capped."""
    from controlnet_ray.model import build_model
    from controlnet_ray.model.controlnet.warp_head import SHAPE_HEAD_MAX_LR

    for lr in (2e-3, OptimConfig().lr):
        torch.manual_seed(0)
        model = build_model(ModelConfig(image_size=32, base_channels=8, feature_dim=32))
        opt = eng.build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()  # AdamW's first step moves every element by its lr (gradient sign)
        moved = {n: (p - before[n]).abs().max().item() for n, p in model.named_parameters()}
        assert moved["shape_head.weight"] == pytest.approx(min(lr, SHAPE_HEAD_MAX_LR), rel=1e-3)
        assert moved["encoder.backbone.stages.0.0.weight"] == pytest.approx(lr, rel=1e-3)


def test_scheduler_warmup_then_cosine_in_optimizer_steps() -> None:
    cfg = OptimConfig(lr=1.0, epochs=10, warmup_epochs=2, gradient_accumulation_steps=2)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = eng.build_scheduler(opt, cfg, steps_per_epoch=5)  # 5 micro -> 3 optimizer steps
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm, total = 6, 30
    assert lrs[0] == pytest.approx(1 / warm)
    assert lrs[warm - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm], strict=False))
    assert lrs[warm] == pytest.approx(1.0)  # the cosine starts at the peak
    assert all(a > b for a, b in zip(lrs[warm:total], lrs[warm + 1 : total], strict=False))
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(0.01 + 0.99 * 0.5)
    assert lrs[total] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.01)


def test_engine_steps_scheduler_once_per_optimizer_step() -> None:
    cfg = OptimConfig(lr=1.0, epochs=4, warmup_epochs=1, gradient_accumulation_steps=2)
    engine = make_engine(cfg, optim="sgd", steps_per_epoch=4)
    lrs = [engine.train_micro_batch(make_batch(2, seed=i)).lr for i in range(4)]
    assert engine.optimizer_steps == 2 and engine.micro_steps == 4
    assert lrs == pytest.approx([0.5, 0.5, 1.0, 1.0])  # 2 optimizer steps/epoch of warm-up


# --------------------------------------------------------------------------- losses


def test_image_loss_types() -> None:
    a, b = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert eng.image_loss(a, b, "mse").item() == pytest.approx(0.25)
    assert eng.image_loss(a, b, "l1").item() == pytest.approx(0.5)
    assert eng.image_loss(a, b, "combined").item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="loss_type"):
        eng.image_loss(a, b, "ssim")


def test_total_loss_weights_and_pose_normalisation() -> None:
    batch = make_batch(4)
    target = batch["target_pose"] / SCALE
    out = SimpleNamespace(
        image=batch["target"], pose_pred=target + 0.1, pose_pred_real=target - 0.2,
        identity_cos=torch.full((4,), 0.25),
    )  # fmt: skip
    cfg = OptimConfig(pose_loss_weight=0.5, identity_loss_weight=2.0)
    terms = eng.compute_losses(out, batch, cfg, SCALE)
    assert terms.image.item() == pytest.approx(0.0)
    assert terms.pose.item() == pytest.approx(0.01 + 0.04, rel=1e-4)
    assert terms.identity.item() == pytest.approx(0.75)
    assert terms.total.item() == pytest.approx(0.5 * 0.05 + 2.0 * 0.75, rel=1e-4)
    out.pose_pred_real = None
    assert eng.compute_losses(out, batch, cfg, SCALE).pose.item() == pytest.approx(0.01, rel=1e-4)


def test_identity_weight_without_encoder_is_a_clear_error() -> None:
    engine = make_engine(OptimConfig(identity_loss_weight=0.1))
    with pytest.raises(eng.MissingIdentityEncoderError, match="--identity_loss_weight"):
        engine.train_micro_batch(make_batch(2))
    engine = make_engine(OptimConfig(identity_loss_weight=0.1), model=TinyNet(identity=True))
    m = engine.train_micro_batch(make_batch(2))
    assert 0.0 < m.identity_loss < 2.0 and m.optimizer_step


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_two_micro_batches_equal_one_big_batch(optim: str) -> None:
    batch = make_batch(8)
    big = make_engine(OptimConfig(lr=1e-2, gradient_accumulation_steps=1, warmup_epochs=0), optim)
    acc = make_engine(OptimConfig(lr=1e-2, gradient_accumulation_steps=2, warmup_epochs=0), optim)
    big_grads, acc_grads = record_grads(big), record_grads(acc)
    assert_close(params(big), params(acc))
    m_big = big.train_micro_batch(batch)
    m1, m2 = (acc.train_micro_batch(b) for b in split(batch, 2))
    assert m_big.optimizer_step and not m1.optimizer_step and m2.optimizer_step
    assert len(big_grads) == len(acc_grads) == 1
    assert_close(big_grads[0], acc_grads[0])
    assert_close(params(big), params(acc))
    assert (m1.loss + m2.loss) / 2 == pytest.approx(m_big.loss, rel=1e-5)


def test_partial_group_at_epoch_end_uses_mean_gradient() -> None:
    batch = make_batch(4)
    one = make_engine(OptimConfig(lr=1e-2, gradient_accumulation_steps=1, warmup_epochs=0))
    four = make_engine(OptimConfig(lr=1e-2, gradient_accumulation_steps=4, warmup_epochs=0))
    g_one, g_four = record_grads(one), record_grads(four)
    one.train_micro_batch(batch)
    m = four.train_micro_batch(batch, is_last_in_epoch=True)
    assert m.optimizer_step and four.optimizer_steps == 1
    assert_close(g_one[0], g_four[0])
    assert_close(params(one), params(four))


# --------------------------------------------------------------------------- non-finite


def test_nan_batch_is_skipped_and_next_batch_trains() -> None:
    engine = make_engine(OptimConfig())
    before = params(engine)
    m = engine.train_micro_batch(nan_batch())
    assert m.skipped and not m.optimizer_step and math.isnan(m.loss)
    assert engine.skipped_steps == 1 and engine.consecutive_nonfinite == 1
    assert all(p.grad is None for p in engine.model.parameters())
    assert_close(before, params(engine), tol=0)
    m = engine.train_micro_batch(make_batch(4))
    assert not m.skipped and m.optimizer_step and math.isfinite(m.loss)
    assert engine.optimizer_steps == 1 and engine.consecutive_nonfinite == 0
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, params(engine), strict=True))


def test_nan_drops_the_partial_accumulation_group() -> None:
    cfg = OptimConfig(lr=1e-2, gradient_accumulation_steps=2, warmup_epochs=0)
    b1, b2, b3 = (make_batch(4, seed=s) for s in (1, 2, 3))
    with_nan, clean = make_engine(cfg), make_engine(cfg)
    for b in (b1, nan_batch(), b2, b3):
        with_nan.train_micro_batch(b)
    for b in (b2, b3):
        clean.train_micro_batch(b)
    assert with_nan.optimizer_steps == clean.optimizer_steps == 1
    assert_close(params(with_nan), params(clean))


def test_consecutive_nans_raise() -> None:
    engine = make_engine(OptimConfig(max_nonfinite_steps=3))
    engine.train_micro_batch(nan_batch())
    engine.train_micro_batch(make_batch(4))  # a good step resets the run of NaNs
    engine.train_micro_batch(nan_batch())
    engine.train_micro_batch(nan_batch())
    with pytest.raises(eng.NonFiniteLossError, match="3 micro-batches in a row"):
        engine.train_micro_batch(nan_batch())
    assert engine.skipped_steps == 4


def test_divergence_by_gradients_names_the_part_that_holds_them() -> None:
    """A finite loss with NaN gradients (as bf16 at batch 1024 gave on an H200): the error
    says in which part of the model, so a user knows where to look."""
    engine = make_engine(OptimConfig(max_nonfinite_steps=2))
    engine.model.pose_head.weight.register_hook(lambda g: g * float("nan"))
    engine.train_micro_batch(make_batch(4))
    with pytest.raises(eng.NonFiniteLossError, match=r"gradient norm nan in pose_head \(1 of 2"):
        engine.train_micro_batch(make_batch(4, seed=1))
    assert engine.skipped_steps == 0 and engine.optimizer_steps == 0


# --------------------------------------------------------------------------- clipping


class SpyScaler:
    """GradScaler stand-in that multiplies the loss by 1024 and logs the call order."""

    def __init__(self, calls: list[str]) -> None:
        self.calls, self.factor = calls, 1024.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.factor

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append("unscale")
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad.div_(self.factor)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append("step")
        optimizer.step()

    def update(self) -> None:
        self.calls.append("update")


def test_unscale_happens_before_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OptimConfig(grad_clip=1e-3)
    engine = make_engine(cfg, amp=eng.AmpSettings(False, torch.float32, True, "spy"))
    calls: list[str] = []
    engine.scaler = SpyScaler(calls)
    real_clip = nn.utils.clip_grads_with_norm_

    def spy_clip(*args, **kwargs):  # noqa: ANN002, ANN003
        calls.append("clip")
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(nn.utils, "clip_grads_with_norm_", spy_clip)
    grads = record_grads(engine)
    m = engine.train_micro_batch(make_batch(4))
    assert calls == ["unscale", "clip", "step", "update"]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[0]]))
    assert m.grad_norm > cfg.grad_clip  # clipping was active ...
    assert norm.item() == pytest.approx(cfg.grad_clip, rel=1e-3)  # ... on unscaled grads


def test_real_grad_scaler_clips_unscaled_gradients() -> None:
    cfg = OptimConfig(grad_clip=1e-3)
    amp = eng.AmpSettings(True, torch.bfloat16, True, "bf16 + GradScaler (test only)")
    engine = make_engine(cfg, amp=amp)
    grads = record_grads(engine)
    m = engine.train_micro_batch(make_batch(4))
    assert m.optimizer_step and engine.scaler.get_scale() > 1
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[0]]))
    assert norm.item() <= cfg.grad_clip * 1.001


# --------------------------------------------------------------------------- state


def test_state_dict_round_trip() -> None:
    cfg = OptimConfig(gradient_accumulation_steps=2)
    amp = eng.AmpSettings(True, torch.bfloat16, True, "bf16 + GradScaler (test only)")
    engine = make_engine(cfg, amp=amp)
    for b in (make_batch(2, seed=1), nan_batch(), make_batch(2, seed=2), make_batch(2, seed=3)):
        engine.train_micro_batch(b)
    state = copy.deepcopy(engine.state_dict())
    fresh = make_engine(cfg, amp=amp)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert (fresh.optimizer_steps, fresh.micro_steps, fresh.skipped_steps) == (1, 4, 1)
    assert fresh.scaler.get_scale() == engine.scaler.get_scale()
    with pytest.raises(KeyError, match="missing"):
        fresh.load_state_dict({"scaler": {}})


# --------------------------------------------------------------------------- evaluate


class Oracle(nn.Module):
    """Returns the target image and a pose 10 degrees off in yaw: known metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, source, source_pose, target_pose, target=None):  # noqa: ANN001
        pose = (target_pose + torch.tensor([10.0, 0.0, 0.0])) / SCALE + self.w
        return SimpleNamespace(image=target, pose_pred=pose, pose_pred_real=None, identity_cos=None)


def test_evaluate_sums_and_means() -> None:
    model = Oracle().train()
    batches = [make_batch(3, seed=1), make_batch(5, seed=2), make_batch(4, seed=3)]
    cfg = OptimConfig(pose_loss_weight=1.0)
    sums = eng.evaluate(model, batches, cfg, CPU, FP32, max_batches=2, keep_sample=True,
                        pose_scale=SCALE)  # fmt: skip
    assert model.training and sums.n == 8
    means = sums.means()
    assert set(means) == {"loss", "image_loss", "pose_loss", "psnr", "ssim", "psnr_face",
                          "pose_mae_deg", "pose_mae_yaw", "pose_mae_pitch",
                          "pose_mae_roll"}  # fmt: skip
    assert means["psnr_face"] == means["psnr"]  # no face region given: the whole crop
    assert means["psnr"] == pytest.approx(100.0) and means["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert means["pose_mae_yaw"] == pytest.approx(10.0, rel=1e-4)
    assert means["pose_mae_pitch"] == pytest.approx(0.0, abs=1e-4)
    assert means["pose_mae_deg"] == pytest.approx(10.0 / 3, rel=1e-4)
    assert means["pose_loss"] == pytest.approx((10 / SCALE) ** 2 / 3, rel=1e-4)
    assert means["loss"] == pytest.approx(means["pose_loss"], rel=1e-4)
    assert sums.sample is not None and sums.sample["output"].shape == (3, 3, 16, 16)
    assert model.w.grad is None
    again = eng.EvalSums.from_tensor(sums.to_tensor())
    assert again == sums and (again + again).n == 16
    with pytest.raises(ValueError, match="no evaluation samples"):
        eng.EvalSums().means()


class Smudged(nn.Module):
    """Returns the target with its left half replaced by grey: exact outside the left half."""

    def forward(self, source, source_pose, target_pose, target=None):  # noqa: ANN001
        image = target.clone()
        image[..., : target.shape[-1] // 2] = 0.0
        return SimpleNamespace(image=image, pose_pred=target_pose / SCALE, pose_pred_real=None,
                               identity_cos=None)  # fmt: skip


def test_evaluate_takes_face_psnr_over_the_face_region_only() -> None:
    """``psnr_face`` is PSNR over ``face_region``'s pixels: a model wrong only outside the
    region is perfect there, and its whole-crop PSNR is not."""
    batches = [make_batch(2, seed=1)]
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[:, 8:] = True  # the right half, where the output equals the target
    means = eng.evaluate(Smudged(), batches, OptimConfig(), CPU, FP32, pose_scale=SCALE,
                         face_region=region).means()  # fmt: skip
    assert means["psnr_face"] == pytest.approx(100.0)
    assert means["psnr"] < 40.0
    region[:, 7] = True  # one wrong column inside: no longer perfect
    worse = eng.evaluate(Smudged(), batches, OptimConfig(), CPU, FP32, pose_scale=SCALE,
                         face_region=region).means()  # fmt: skip
    assert worse["psnr_face"] < 40.0


def test_evaluate_restores_eval_mode_too() -> None:
    model = Oracle().eval()
    eng.evaluate(model, [make_batch(2)], OptimConfig(), CPU, FP32, pose_scale=SCALE)
    assert not model.training


# --------------------------------------------------------------------------- boundaries


def test_engine_import_does_not_load_ray() -> None:
    code = (
        "import sys, controlnet_ray.engine, controlnet_ray.metrics; "
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; "
        "sys.exit(f'ray imported: {bad[:3]}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_pose_scale_comes_from_the_model_package() -> None:
    import controlnet_ray.model as model_pkg

    assert eng.pose_scale_deg() == float(model_pkg.POSE_SCALE_DEG)


def test_real_model_follows_the_engine_contract() -> None:
    """The colleague-owned model through the engine's default path (POSE_SCALE_DEG import)."""
    import controlnet_ray.model as model_pkg

    torch.manual_seed(0)
    mcfg = ModelConfig(image_size=32, encoder="cnn", base_channels=8, feature_dim=32)
    model = model_pkg.build_model(mcfg)
    cfg = OptimConfig(gradient_accumulation_steps=2)
    opt = eng.build_optimizer(model, cfg)
    engine = eng.TrainEngine(model, opt, eng.build_scheduler(opt, cfg, 3), cfg, CPU, FP32)
    steps = [
        engine.train_micro_batch(make_batch(2, size=32, seed=i), is_last_in_epoch=i == 2)
        for i in range(3)
    ]
    assert [m.optimizer_step for m in steps] == [False, True, True]
    assert all(math.isfinite(m.loss) for m in steps)
    means = eng.evaluate(model, [make_batch(2, size=32)], cfg, CPU, FP32).means()
    assert all(math.isfinite(v) for v in means.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_warp_model_trains_with_amp_on_cuda() -> None:
    """The product's model (warp generator) through the engine on CUDA with AMP as resolved
    for the device (bf16 where supported, else fp16 with a GradScaler): finite losses, weights
    stay fp32 and move, evaluation agrees with the device."""
    from controlnet_ray.model import build_model

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=32, base_channels=8, feature_dim=32)).to(cuda)
    cfg = OptimConfig()
    opt = eng.build_optimizer(model, cfg)
    amp = eng.resolve_amp(True, cuda)
    engine = eng.TrainEngine(model, opt, eng.build_scheduler(opt, cfg, 4), cfg, cuda, amp)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [engine.train_micro_batch(make_batch(4, size=32, seed=i)) for i in range(4)]
    assert all(math.isfinite(m.loss) and not m.skipped for m in steps[1:])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    means = eng.evaluate(model, [make_batch(4, size=32)], cfg, cuda, amp).means()
    assert all(math.isfinite(v) for v in means.values())


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, queue: multiprocessing.Queue) -> None:
    """Rank 1 sees a NaN on its second micro-batch; everyone must skip it and stay in step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DDP(TinyNet())
        cfg = OptimConfig(lr=1e-2, gradient_accumulation_steps=2, warmup_epochs=0)
        opt = eng.build_optimizer(model, cfg)
        engine = eng.TrainEngine(model, opt, None, cfg, CPU, FP32, pose_scale=SCALE)
        batches = [make_batch(2, seed=10 * rank + i) for i in range(4)]
        if rank == 1:
            batches[1] = nan_batch(2)
        skipped = [engine.train_micro_batch(b).skipped for b in batches]
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        queue.put((rank, skipped, engine.optimizer_steps, flat.tolist()))  # no shared memory
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_skips_and_do_not_deadlock() -> None:
    results = run_ranks(_ddp_worker, world=2, timeout=60)
    assert results[0][0] == results[1][0] == [False, True, False, False]
    assert results[0][1] == results[1][1] == 1
    torch.testing.assert_close(torch.tensor(results[0][2]), torch.tensor(results[1][2]))


def test_one_unwrap_for_ddp_in_engine_worker_and_checkpoint(tmp_path: Path) -> None:
    """The engine (evaluation, the frozen critic), the worker (optimisers) and checkpoints all
    unwrap through ``checkpoint.unwrap_model``: a real DDP wrapper (one gloo rank, in-process)
    and DataParallel give the bare module, a bare module comes back as itself."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from controlnet_ray.checkpoint import unwrap_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = TinyNet()
        ddp = DDP(net)
        assert unwrap_model(ddp) is net and unwrap_model(net) is net
        assert unwrap_model(nn.DataParallel(net)) is net
        disc = nn.Conv2d(3, 1, 3)
        adv = eng.Adversary(DDP(disc), torch.optim.SGD(disc.parameters(), lr=0.1), CPU, FP32)
        assert adv.bare is disc
        sums = eng.evaluate(ddp, [make_batch(2)], OptimConfig(), CPU, FP32, pose_scale=SCALE)
        assert all(math.isfinite(v) for v in sums.means().values())
    finally:
        dist.destroy_process_group()
