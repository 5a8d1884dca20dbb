"""The adversarial option: patch discriminator, hinge losses in the engine, checkpointed state.

Uses the engine tests' contract stand-in (TinyNet, no BatchNorm or dropout) at 32 px, the
smallest size the discriminator's five 4x4 convolutions still map to a 2x2 patch map.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from controlnet_ray import checkpoint as ckpt
from controlnet_ray import engine as eng
from controlnet_ray import files
from controlnet_ray.cli import parse_train_args
from controlnet_ray.config import ConfigError, ModelConfig, OptimConfig, TrainConfig
from controlnet_ray.model import build_model
from controlnet_ray.model.discriminator import PatchDiscriminator, build_discriminator
from tests.ddp_helpers import run_ranks
from tests.test_engine import CPU, FP32, SCALE, TinyNet, make_batch

SIZE = 32
SIGNATURE = {"encoder": "tiny"}


def batch(seed: int, b: int = 4) -> dict[str, torch.Tensor]:
    return make_batch(b, size=SIZE, seed=seed)


def make(
    cfg: OptimConfig, amp: eng.AmpSettings = FP32, seed: int = 0, adversary: bool = True
) -> eng.TrainEngine:
    """Model, discriminator, optimisers and engine from one seed (no scheduler warm-up)."""
    torch.manual_seed(seed)
    model, disc = TinyNet(), PatchDiscriminator(base_channels=8)
    opt = eng.build_optimizer(model, cfg)
    sched = eng.build_scheduler(opt, cfg, steps_per_epoch=10)
    adv = eng.Adversary(disc, eng.build_disc_optimizer(disc, cfg), CPU, amp) if adversary else None
    return eng.TrainEngine(model, opt, sched, cfg, CPU, amp, pose_scale=SCALE, adversary=adv)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trained tensors only: spectral norm's power-iteration vectors move on every forward."""
    return {k: v for k, v in snapshot(module).items() if not k.endswith(("_u", "_v"))}


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


ADV = OptimConfig(adversarial_loss_weight=0.5, warmup_epochs=0, lr=1e-2, disc_lr=1e-2)


# --------------------------------------------------------------------------- discriminator


def test_every_conv_has_spectral_norm_and_output_is_a_patch_map() -> None:
    disc = build_discriminator(ModelConfig(base_channels=8))
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    for conv in convs:
        assert parametrize.is_parametrized(conv, "weight")
        assert "SpectralNorm" in type(conv.parametrizations.weight[0]).__name__
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert disc(x, torch.zeros(2, 3)).shape == (2, 1, 12, 12)
    assert disc(x[..., :SIZE, :SIZE], torch.zeros(2, 3)).shape == (2, 1, 2, 2)


def test_spectral_norm_bounds_each_layer_and_pose_conditions_the_output() -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=8)
    x = torch.rand(2, 3, SIZE, SIZE)
    for _ in range(50):  # one power iteration per training-mode forward
        disc(x, torch.zeros(2, 3))
    disc.eval()
    for conv in (m for m in disc.modules() if isinstance(m, nn.Conv2d)):
        sigma = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.05)
    zero, turned = disc(x, torch.zeros(2, 3)), disc(x, torch.tensor([[60.0, 0, 0]] * 2))
    assert not torch.allclose(zero, turned)


def test_discriminator_is_never_part_of_the_model() -> None:
    mcfg = ModelConfig(image_size=SIZE, encoder="cnn", base_channels=8, feature_dim=32)
    model, disc = build_model(mcfg), build_discriminator(mcfg)
    assert not {id(p) for p in model.parameters()} & {id(p) for p in disc.parameters()}
    assert not any("discriminator" in k or "parametrizations" in k for k in model.state_dict())


# --------------------------------------------------------------------------- engine, weight 0


def test_weight_zero_is_the_plain_step_exactly() -> None:
    """Off (weight 0, even with a discriminator passed) = no adversary = a hand-written step."""
    cfg = OptimConfig(warmup_epochs=0, gradient_accumulation_steps=2)
    off, plain = make(cfg), make(cfg, adversary=False)
    g0 = snapshot(off.model)
    assert off.adversary is None
    steps = [batch(i) for i in range(4)]
    m_off = [off.train_micro_batch(b) for b in steps]
    m_plain = [plain.train_micro_batch(b) for b in steps]
    assert m_off == m_plain and all(m.adv_loss == m.disc_loss == 0.0 for m in m_off)
    assert_equal(snapshot(off.model), snapshot(plain.model))
    assert "adversary" not in off.state_dict()
    assert changed(g0, snapshot(off.model))  # it did train

    # the same two optimizer steps by hand: forward, loss / 2, backward, clip, AdamW step
    torch.manual_seed(0)
    model = TinyNet()
    opt = eng.build_optimizer(model, cfg)
    sched = eng.build_scheduler(opt, cfg, steps_per_epoch=10)
    for group in (steps[:2], steps[2:]):
        for b in group:
            out = model(b["source"], b["source_pose"], b["target_pose"], target=b["target"])
            (eng.compute_losses(out, b, cfg, SCALE).total / 2).backward()
        nn.utils.clip_grad_norm_(list(model.parameters()), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    assert_equal(snapshot(model), snapshot(off.model))


def test_positive_weight_needs_an_adversary() -> None:
    with pytest.raises(ValueError, match="no Adversary"):
        make(ADV, adversary=False)


# --------------------------------------------------------------------------- engine, weight > 0


def test_steps_train_both_sides_with_finite_hinge_losses() -> None:
    engine = make(ADV)
    g0, d0 = snapshot(engine.model), snapshot(engine.adversary.discriminator)
    metrics = [engine.train_micro_batch(batch(i)) for i in range(3)]
    assert all(m.optimizer_step and not m.skipped for m in metrics)
    assert all(math.isfinite(m.adv_loss) and math.isfinite(m.disc_loss) for m in metrics)
    assert all(m.disc_loss >= 0 for m in metrics)  # a sum of two hinge means
    assert engine.adversary.steps == 3 == engine.optimizer_steps
    assert changed(g0, snapshot(engine.model)) == set(g0)
    d_changed = changed(d0, snapshot(engine.adversary.discriminator))
    assert {k for k in d0 if k.endswith(("original", "bias"))} <= d_changed
    # the reported loss is the non-adversarial total (comparable with validation)
    m = metrics[-1]
    assert m.loss == pytest.approx(m.image_loss + ADV.pose_loss_weight * m.pose_loss, rel=1e-6)


def test_adversarial_term_moves_the_generator_and_only_the_generator() -> None:
    """The generator's step differs from weight ~0's; the discriminator's gradient is exactly
    that of its own hinge loss (the generator's term reaches it through a frozen copy)."""
    cfg = OptimConfig(adversarial_loss_weight=0.5, warmup_epochs=0, grad_clip=1e6)
    engine, tiny = make(cfg), make(OptimConfig(adversarial_loss_weight=1e-30, warmup_epochs=0))
    b = batch(0)
    model, disc = copy.deepcopy(engine.model), copy.deepcopy(engine.adversary.discriminator)
    seen: list[list[torch.Tensor]] = []
    engine.adversary.optimizer.register_step_pre_hook(
        lambda opt, a, k: seen.append([p.grad.clone() for p in opt.param_groups[0]["params"]])
    )
    engine.train_micro_batch(b)
    tiny.train_micro_batch(b)
    assert changed(snapshot(engine.model), snapshot(tiny.model))

    image = model(b["source"], b["source_pose"], b["target_pose"], target=b["target"]).image
    pose = b["target_pose"]
    real, fake = disc(torch.cat([b["target"], image.detach()]), torch.cat([pose, pose])).chunk(2)
    expected = torch.autograd.grad(eng.hinge_disc_loss(real, fake), list(disc.parameters()))
    assert len(seen) == 1
    for got, want in zip(seen[0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_hinge_losses_values_and_weights() -> None:
    real, fake = torch.tensor([[2.0, 0.0]]), torch.tensor([[-2.0, 0.5]])
    assert eng.hinge_disc_loss(real, fake).item() == pytest.approx(0.5 + 0.75)
    assert eng.hinge_gen_loss(fake).item() == pytest.approx(0.75)
    w = torch.tensor([[0.0, 1.0]])
    assert eng.hinge_disc_loss(real, fake, w).item() == pytest.approx(1.0 + 1.5)
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2] = 1.0
    assert eng.patch_weights(region, torch.zeros(1, 1, 2, 2)).flatten().tolist() == [1, 0, 1, 0]


def test_accumulation_steps_the_discriminator_once_per_optimizer_step() -> None:
    engine = make(OptimConfig(adversarial_loss_weight=0.5, gradient_accumulation_steps=2))
    d0 = weights(engine.adversary.discriminator)
    first = engine.train_micro_batch(batch(0))
    assert not first.optimizer_step and engine.adversary.steps == 0
    assert not changed(d0, weights(engine.adversary.discriminator))
    assert all(p.grad is not None for p in engine.adversary.discriminator.parameters())
    engine.train_micro_batch(batch(1))
    engine.train_micro_batch(batch(2))
    engine.train_micro_batch(batch(3), is_last_in_epoch=True)
    assert engine.adversary.steps == 2 == engine.optimizer_steps


def test_non_finite_batch_skips_both_sides() -> None:
    engine = make(ADV)
    g0, d0 = snapshot(engine.model), weights(engine.adversary.discriminator)
    bad = batch(99)
    bad["source"][0, 0, 0, 0] = float("nan")
    m = engine.train_micro_batch(bad)
    assert m.skipped and not m.optimizer_step and engine.adversary.steps == 0
    assert all(p.grad is None for p in engine.adversary.discriminator.parameters())
    assert all(p.grad is None for p in engine.model.parameters())
    assert not changed(g0, snapshot(engine.model))
    assert not changed(d0, weights(engine.adversary.discriminator))
    assert engine.train_micro_batch(batch(1)).optimizer_step


def test_bf16_autocast_with_both_grad_scalers() -> None:
    amp = eng.AmpSettings(True, torch.bfloat16, True, "bf16 + GradScaler (test only)")
    engine = make(ADV, amp=amp)
    m = engine.train_micro_batch(batch(0))
    assert m.optimizer_step and math.isfinite(m.disc_loss) and engine.adversary.steps == 1
    assert engine.adversary.scaler is not engine.scaler
    assert engine.adversary.scaler.get_scale() > 1
    assert (
        engine.state_dict()["adversary"]["scaler"]["scale"] == engine.adversary.scaler.get_scale()
    )


# --------------------------------------------------------------------------- checkpoints


def save(engine: eng.TrainEngine, path: Path, with_disc: bool = True) -> Path:
    adv = engine.adversary
    state = ckpt.build_checkpoint(
        epoch=1, model=engine.model, optimizer=engine.optimizer, scheduler=engine.scheduler,
        cfg=TrainConfig(), model_signature=SIGNATURE, best_val_loss=1.0, best_val_psnr=10.0,
        train_history=[], val_history=[], engine_state=engine.state_dict(),
        discriminator=adv.discriminator if with_disc else None,
        discriminator_optimizer=adv.optimizer if with_disc else None,
    )  # fmt: skip
    return files.atomic_save(state, path)


def resume(path: Path, cfg: OptimConfig) -> tuple[eng.TrainEngine, str]:
    """What the worker does, in a process with other RNG streams and initial weights."""
    engine = make(cfg, seed=123)
    state = ckpt.load_checkpoint(path)
    engine.model.load_state_dict(state["model_state_dict"])
    line = ckpt.restore_discriminator(
        state, engine.adversary.discriminator, engine.adversary.optimizer
    )
    engine.optimizer.load_state_dict(state["optimizer_state_dict"])
    engine.scheduler.load_state_dict(state["scheduler_state_dict"])
    engine.load_state_dict(state["engine_state"])
    return engine, line


def test_resumed_engine_continues_bit_exactly(tmp_path: Path) -> None:
    cfg = OptimConfig(adversarial_loss_weight=0.5, gradient_accumulation_steps=2, disc_lr=1e-3)
    engine = make(cfg)
    for i in range(4):
        engine.train_micro_batch(batch(i))
    path = save(engine, tmp_path / "a.pth")
    resumed, line = resume(path, cfg)
    assert line.startswith("discriminator and its optimizer resumed")
    assert resumed.state_dict() == engine.state_dict()
    for i in range(4, 6):
        m_a, m_b = engine.train_micro_batch(batch(i)), resumed.train_micro_batch(batch(i))
        assert m_a == m_b
    assert_equal(snapshot(engine.model), snapshot(resumed.model))
    assert_equal(
        snapshot(engine.adversary.discriminator), snapshot(resumed.adversary.discriminator)
    )
    assert_equal(
        engine.adversary.optimizer.state_dict()["state"][0],
        resumed.adversary.optimizer.state_dict()["state"][0],
    )


def test_file_keys_and_files_without_a_discriminator(tmp_path: Path) -> None:
    engine = make(ADV)
    engine.train_micro_batch(batch(0))
    raw = torch.load(save(engine, tmp_path / "with.pth"), weights_only=True)
    assert {ckpt.DISC_KEY, ckpt.DISC_OPTIMIZER_KEY} <= raw.keys()
    assert not any("parametrizations" in k for k in raw["model_state_dict"])
    plain = torch.load(save(engine, tmp_path / "without.pth", with_disc=False), weights_only=True)
    assert ckpt.DISC_KEY not in plain and ckpt.DISC_OPTIMIZER_KEY not in plain

    # the option switched on over a file without a discriminator: fresh one, said so
    resumed, line = resume(tmp_path / "without.pth", ADV)
    assert "holds no discriminator: a fresh one starts" in line
    assert resumed.train_micro_batch(batch(1)).optimizer_step
    # an engine state saved without the option loads into one with it (fresh scaler, counters)
    state = make(ADV, adversary=True).state_dict()
    state.pop("adversary")
    resumed.load_state_dict(state)
    assert resumed.adversary.steps == 0


def test_a_new_stage_loads_discriminator_weights_only(tmp_path: Path) -> None:
    engine = make(ADV)
    engine.train_micro_batch(batch(0))
    state = ckpt.load_checkpoint(save(engine, tmp_path / "a.pth"))
    fresh = make(ADV, seed=5)
    line = ckpt.restore_discriminator(state, fresh.adversary.discriminator)
    assert "fresh discriminator optimizer" in line
    assert_equal(snapshot(fresh.adversary.discriminator), state[ckpt.DISC_KEY])
    assert not fresh.adversary.optimizer.state_dict()["state"]
    wide = PatchDiscriminator(base_channels=16)
    with pytest.raises(ckpt.CheckpointError, match="discriminator does not fit"):
        ckpt.restore_discriminator(state, wide)


def test_non_finite_discriminator_is_never_saved(tmp_path: Path) -> None:
    engine = make(ADV)
    with torch.no_grad():
        engine.adversary.discriminator.net[0].bias[0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to save.*discriminator\.net\.0"):
        save(engine, tmp_path / "bad.pth")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adversarial_loss_weight", "-0.1"], "--adversarial_loss_weight must be >= 0"),
        (["--adversarial_loss_weight", "nan"], "--adversarial_loss_weight must be a finite"),
        (["--disc_lr", "0"], "--disc_lr must be > 0"),
        (["--disc_lr", "inf"], "--disc_lr must be a finite"),
    ],
)
def test_config_validation_names_the_flags(argv: list[str], message: str) -> None:
    cfg = parse_train_args(["--adversarial_loss_weight", "0.05", "--disc_lr", "1e-4"])
    assert (cfg.optim.adversarial_loss_weight, cfg.optim.disc_lr) == (0.05, 1e-4)
    assert (OptimConfig().adversarial_loss_weight, OptimConfig().disc_lr) == (0.0, 2e-4)
    bad = TrainConfig()
    flag, value = argv
    setattr(bad.optim, flag[2:], float(value))
    with pytest.raises(ConfigError, match=message):
        bad.validate()


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, queue: multiprocessing.Queue) -> None:
    """Both nets DDP-wrapped, accumulation 2; rank 1 sees a NaN on its second micro-batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model, disc = DDP(TinyNet()), DDP(PatchDiscriminator(base_channels=8))
        cfg = OptimConfig(adversarial_loss_weight=0.5, gradient_accumulation_steps=2)
        opt = eng.build_optimizer(model, cfg)
        adv = eng.Adversary(disc, eng.build_disc_optimizer(disc.module, cfg), CPU, FP32)
        engine = eng.TrainEngine(model, opt, None, cfg, CPU, FP32, pose_scale=SCALE, adversary=adv)
        batches = [batch(10 * rank + i, b=2) for i in range(4)]
        if rank == 1:
            batches[1] = make_batch(2, size=SIZE, seed=99)
            batches[1]["source"][0, 0, 0, 0] = float("nan")
        skipped = [engine.train_micro_batch(b).skipped for b in batches]
        flat = [
            torch.cat([p.detach().flatten() for p in net.parameters()]) for net in (model, disc)
        ]
        queue.put((rank, skipped, adv.steps, [f.tolist() for f in flat]))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_generator_and_discriminator_in_step() -> None:
    results = run_ranks(_ddp_worker, world=2, timeout=90)
    assert results[0][0] == results[1][0] == [False, True, False, False]
    assert results[0][1] == results[1][1] == 1
    for net in range(2):
        torch.testing.assert_close(
            torch.tensor(results[0][2][net]), torch.tensor(results[1][2][net])
        )


# The real CLI run that resumes the discriminator: tests/test_resume_faults.py (stage 2 re-run).
