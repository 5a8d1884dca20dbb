"""Tests for controlnet_ray.model: shapes, zero-init control, freezing, weight loading, overfit."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from controlnet_ray.config import ConfigError, ModelConfig, TrainConfig
from controlnet_ray.model import (
    POSE_SCALE_DEG,
    ModelOutput,
    WeightsError,
    build_model,
    describe_encoder_choice,
    flops_per_sample,
    iresnet,
    load_iresnet,
    model_signature,
    resolve_encoder,
    trainable_parameters,
)
from controlnet_ray.model.controlnet import (
    COPY_PRIOR,
    COPY_REACH,
    MASK_PRIOR,
    SHAPE_CENTRE_REACH,
    SHAPE_RADII_REACH,
    learned_shape,
    warp_channels,
)
from controlnet_ray.model.warp import (
    JAW_CENTER,
    JAW_RADII,
    PROXY_CENTER,
    PROXY_RADII,
    ProxyShape,
    fixed_shape,
    pixel_grid,
    proxy_flow,
    warp,
)

SMALL_ARCFACE = 32  # iresnet input size used where the test does not need InsightFace's 112


def _batch(n: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "source": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "target": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "source_pose": (torch.rand(n, 3, generator=g) * 2 - 1) * 60,
        "target_pose": (torch.rand(n, 3, generator=g) * 2 - 1) * 60,
    }


def _run(model: nn.Module, b: dict[str, torch.Tensor], target: bool = True) -> ModelOutput:
    return model(
        b["source"], b["source_pose"], b["target_pose"], target=b["target"] if target else None
    )


def _train_steps(
    model: nn.Module, b: dict[str, torch.Tensor], steps: int, lr: float = 1e-3
) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(trainable_parameters(model), lr=lr)
    for _ in range(steps):
        out = _run(model, b)
        pose_t = b["target_pose"] / POSE_SCALE_DEG
        loss = (
            F.mse_loss(out.image, b["target"])
            + F.mse_loss(out.pose_pred, pose_t)
            + F.mse_loss(out.pose_pred_real, pose_t)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _randomise_iresnet(net: nn.Module, seed: int = 0) -> nn.Module:
    """Well-scaled random weights and BN statistics, so BN folding visibly matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.3 + 0.1)
    return net.eval()


def _export_like_arcface_torch(net: nn.Module, path: Path, size: int, fold: bool = True) -> None:
    """arcface_torch's torch2onnx: eval mode, legacy exporter, opset 11, input 'data', dynamic
    batch axis; the legacy exporter then folds each Conv+BatchNorm pair (``fold=False`` keeps
    them apart, as other exporters may)."""
    mode = torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (torch.zeros(1, 3, size, size),),
            str(path),
            input_names=["data"],
            opset_version=11,
            dynamo=False,
            training=mode,
            dynamic_axes={"data": {0: "None"}},
        )


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """These models are small: one intra-op thread is nearly as fast on an idle 2-core box, and
    on a busy one two spinning OpenMP threads per process ran the same steps ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def iresnet_pth(weights_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = _randomise_iresnet(iresnet(18, input_size=SMALL_ARCFACE), seed=1).state_dict()
    path = weights_dir / "r18_arcface.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def resnet50_pth(weights_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    import torchvision

    sd = torchvision.models.resnet50(weights=None).state_dict()
    g = torch.Generator().manual_seed(2)
    for k, v in sd.items():  # values no init would produce
        if v.is_floating_point():
            sd[k] = v + torch.rand(v.shape, generator=g) * 0.01 + 0.001
    path = weights_dir / "resnet50_imagenet.pth"
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope="module")
def iresnet_onnx(weights_dir: Path) -> tuple[Path, nn.Module]:
    net = _randomise_iresnet(iresnet(18, input_size=SMALL_ARCFACE), seed=3)
    path = weights_dir / "r18_small.onnx"
    _export_like_arcface_torch(net, path, SMALL_ARCFACE)
    return path, net


# --------------------------------------------------------------------------- forward contract


@pytest.mark.parametrize("generator", ["warp", "plain"])
@pytest.mark.parametrize("size", [64, 112])
def test_forward_shapes_and_range(size: int, generator: str) -> None:
    model = build_model(ModelConfig(image_size=size, generator=generator))
    b = _batch(2, size)
    out = _run(model, b)
    assert out.image.shape == (2, 3, size, size)
    assert out.image.min() >= -1 and out.image.max() <= 1
    assert out.pose_pred.shape == (2, 3) and out.pose_pred_real.shape == (2, 3)
    assert out.identity_cos is None
    assert out.region.shape == (2, 1, size, size) and set(out.region.unique().tolist()) <= {0, 1}
    no_target = _run(model, b, target=False)
    assert no_target.pose_pred_real is None and no_target.identity_cos is None


def test_resnet50_encoder_at_112_interpolates_small_maps() -> None:
    """At 112 ResNet-50's layer4 is 4x4 (stride 32); the decoder still gets every scale."""
    model = build_model(ModelConfig(encoder="resnet50", feature_dim=64)).eval()
    b = _batch(1, 112)
    with torch.no_grad():
        feats = model.encoder(b["source"])
        out = _run(model, b)
    sizes = [tuple(m.shape[-2:]) for m in feats.maps]
    assert sizes == [(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]
    assert out.image.shape == (1, 3, 112, 112) and torch.isfinite(out.image).all()


def test_rejects_bad_inputs() -> None:
    model = build_model(ModelConfig(image_size=64))
    b = _batch(2, 64)
    with pytest.raises(ValueError, match="target_pose"):
        model(b["source"], b["source_pose"], b["target_pose"][:1])
    with pytest.raises(ValueError, match="multiples of 16"):
        model(b["source"][..., :60, :60], b["source_pose"], b["target_pose"])


def test_pose_head_detached_on_generated_image() -> None:
    model = build_model(ModelConfig(image_size=64))
    out = _run(model, _batch(2, 64))
    out.pose_pred.sum().backward()
    assert all(p.grad is None for p in model.pose_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    model.zero_grad(set_to_none=True)
    _run(model, _batch(2, 64)).pose_pred_real.sum().backward()
    assert all(p.grad is not None for p in model.pose_head.parameters())


# --------------------------------------------------------------------------- control branch


def test_zero_init_control_is_neutral_then_learns() -> None:
    model = build_model(ModelConfig(image_size=64, num_control_layers=5))
    b = _batch(2, 64)
    args = (b["source"], b["source_pose"], b["target_pose"])
    with torch.no_grad():
        assert torch.equal(model(*args).image, model.generate(*args, use_control=False))
    _train_steps(model, b, steps=1)
    with torch.no_grad():
        with_control = model.generate(*args)
        diff = (with_control - model.generate(*args, use_control=False)).abs().max()
        other_pose = model.generate(b["source"], b["source_pose"], b["target_pose"].flip(0))
    assert diff > 1e-6, "control branch still has no effect after an optimizer step"
    assert (with_control - other_pose).abs().max() > 1e-6, "output ignores the target pose"


def test_freeze_generator() -> None:
    model = build_model(ModelConfig(image_size=64, freeze_generator=True))
    gen_before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    others = {
        n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("generator.")
    }
    opt = _train_steps(model, _batch(4, 64), steps=3)
    given = {id(p) for group in opt.param_groups for p in group["params"]}
    assert given == {id(p) for n, p in model.named_parameters() if not n.startswith("generator.")}
    for k, v in model.generator.state_dict().items():
        assert torch.equal(v, gen_before[k]), f"generator tensor {k} changed"
    params = dict(model.named_parameters())
    for part in ("encoder.", "control.", "pose_head."):
        assert any(
            not torch.equal(params[n], v) for n, v in others.items() if n.startswith(part)
        ), f"{part} did not train"


@pytest.mark.parametrize("encoder", ["iresnet", "resnet50"])
def test_freeze_backbone_keeps_weights_and_bn_stats(encoder: str, iresnet_pth: tuple) -> None:
    weights = str(iresnet_pth[0]) if encoder == "iresnet" else None
    cfg = ModelConfig(
        image_size=32,
        encoder=encoder,
        encoder_weights=weights,
        iresnet_depth=18,
        feature_dim=64,
        freeze_backbone=True,
    )
    model = build_model(cfg)
    model.train()
    backbone = model.encoder.backbone
    assert not backbone.training and model.encoder.code_proj.training
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in model.encoder.code_proj.parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    _train_steps(model, _batch(2, 32), steps=2)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"frozen backbone tensor {k} moved"


def test_bn_stats_move_without_freeze_backbone() -> None:
    """Guards the test above: the same training does move unfrozen BN statistics."""
    model = build_model(ModelConfig(image_size=32, encoder="resnet50", feature_dim=64))
    before = model.encoder.backbone.bn1.running_mean.clone()
    _train_steps(model, _batch(2, 32), steps=1)
    assert not torch.equal(before, model.encoder.backbone.bn1.running_mean)


# --------------------------------------------------------------------------- weights


def _assert_loaded(backbone: nn.Module, sd: dict[str, torch.Tensor], skip: str = "") -> None:
    loaded = backbone.state_dict()
    keys = [k for k in sd if not (skip and k.startswith(skip))]
    assert keys and all(torch.equal(loaded[k], sd[k]) for k in keys)


@pytest.mark.parametrize(
    ("weights", "encoder", "described", "size", "extra", "skip"),
    [
        ("iresnet_pth", "iresnet", "iresnet18", 64, {"iresnet_depth": 18}, ""),
        ("resnet50_pth", "resnet50", "resnet50", 32, {"feature_dim": 64}, "fc."),
    ],
    ids=("iresnet18", "resnet50"),
)
def test_pth_auto_and_not_overwritten(
    weights: str,
    encoder: str,
    described: str,
    size: int,
    extra: dict,
    skip: str,
    request: pytest.FixtureRequest,
) -> None:
    """A .pth picks its encoder by itself, and its weights reach the backbone unchanged."""
    path, sd = request.getfixturevalue(weights)
    cfg = ModelConfig(image_size=size, encoder_weights=str(path), **extra)
    assert resolve_encoder(cfg)[0] == encoder
    assert described in describe_encoder_choice(cfg)
    model = build_model(cfg)
    _assert_loaded(model.encoder.backbone, sd, skip=skip)
    assert _run(model, _batch(2, size)).image.shape == (2, 3, size, size)


def test_iresnet_depth_mismatch_names_flag(iresnet_pth: tuple) -> None:
    cfg = ModelConfig(encoder_weights=str(iresnet_pth[0]), iresnet_depth=50)
    with pytest.raises(WeightsError, match="--iresnet_depth 18"):
        build_model(cfg)


def test_auto_without_weights_is_cnn(iresnet_onnx: tuple) -> None:
    assert resolve_encoder(ModelConfig())[0] == "cnn"
    assert "cnn" in describe_encoder_choice(ModelConfig())
    cfg = ModelConfig(encoder_weights=str(iresnet_onnx[0]), iresnet_depth=18)
    assert resolve_encoder(cfg)[0] == "iresnet"
    assert model_signature(cfg)["encoder"] == "iresnet"
    assert model_signature(cfg)["iresnet_depth"] == 18


def test_onnx_round_trip_with_folded_bn(iresnet_onnx: tuple) -> None:
    import onnx

    path, net = iresnet_onnx
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # 21 convs, and only the 10 BatchNorms that do not follow a conv survive folding.
    assert ops.count("Conv") == 21 and ops.count("BatchNormalization") == 10, ops
    loaded = load_iresnet(path, depth=18).eval()
    assert loaded.fused
    x = torch.rand(3, 3, SMALL_ARCFACE, SMALL_ARCFACE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, got = net(x * 2 - 1), loaded(x * 2 - 1)
    assert ref.abs().max() > 1.0  # a meaningful comparison, not one of near-zeros
    assert (ref - got).abs().max() < 1e-4


def test_onnx_round_trip_unfolded_bn(weights_dir: Path) -> None:
    import onnx

    net = _randomise_iresnet(iresnet(18, input_size=SMALL_ARCFACE), seed=7)
    path = weights_dir / "r18_unfolded.onnx"
    _export_like_arcface_torch(net, path, SMALL_ARCFACE, fold=False)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("BatchNormalization") == 31
    x = torch.rand(2, 3, SMALL_ARCFACE, SMALL_ARCFACE) * 2 - 1
    with torch.no_grad():
        assert (load_iresnet(path, depth=18).eval()(x) - net(x)).abs().max() < 1e-4


def test_onnx_encoder_matches_file(iresnet_onnx: tuple) -> None:
    path, net = iresnet_onnx
    cfg = ModelConfig(
        image_size=64, encoder_weights=str(path), iresnet_depth=18, freeze_backbone=True
    )
    model = build_model(cfg).eval()
    x = torch.rand(2, 3, SMALL_ARCFACE, SMALL_ARCFACE) * 2 - 1
    with torch.no_grad():
        assert (model.encoder.backbone(x) - net(x)).abs().max() < 1e-4


def test_onnx_loads_in_insightface_model_zoo(weights_dir: Path) -> None:
    """InsightFace routes square >=112 inputs to ArcFaceONNX, which feeds BGR uint8 crops as
    (RGB - 127.5) / 127.5: our [-1, 1] convention, so embeddings must agree.  Tolerance: both
    run float32 with different kernels (ORT fuses/reorders), giving ~1e-6 relative error per
    layer; 1e-4 of the embedding's scale leaves wide margin yet catches any real mapping bug."""
    model_zoo = pytest.importorskip("insightface.model_zoo")
    net = _randomise_iresnet(iresnet(18), seed=5)
    path = weights_dir / "r18_112.onnx"
    _export_like_arcface_torch(net, path, 112)
    zoo = model_zoo.get_model(str(path), providers=["CPUExecutionProvider"])
    assert type(zoo).__name__ == "ArcFaceONNX" and zoo.input_mean == 127.5
    bgr = np.random.default_rng(6).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    theirs = np.stack([zoo.get_feat(img).ravel() for img in bgr])
    rgb = torch.from_numpy(bgr[..., ::-1].copy()).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ours = load_iresnet(path).eval()((rgb - 127.5) / 127.5).numpy()
    scale = np.abs(theirs).max()
    assert scale > 1.0
    assert np.abs(ours - theirs).max() < 1e-4 * scale
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() > 0.99999


def test_identity_cos_uses_frozen_hidden_arcface(iresnet_onnx: tuple) -> None:
    model = build_model(ModelConfig(image_size=64), identity_weights=str(iresnet_onnx[0]))
    assert not any(k.startswith("identity") for k in model.state_dict())
    plain = {id(p) for p in trainable_parameters(model)}
    assert all(id(p) not in plain for p in model.identity_net.parameters())
    b = _batch(2, 64)
    out = _run(model, b)
    assert out.identity_cos.shape == (2,) and out.identity_cos.abs().max() <= 1 + 1e-6
    (1 - out.identity_cos.mean()).backward()
    assert all(p.grad is None for p in model.identity_net.parameters())
    assert any(p.grad is not None for p in model.generator.parameters())
    assert _run(model, b, target=False).identity_cos is None
    model.double()
    assert next(model.identity_net.parameters()).dtype == torch.float64


def test_identity_weights_from_the_config_reach_the_model(iresnet_onnx: tuple) -> None:
    """--identity_weights is how the CLI's identity loss gets its frozen ArcFace."""
    cfg = TrainConfig()
    cfg.optim.identity_loss_weight = 0.5
    with pytest.raises(ConfigError, match="--identity_loss_weight 0.5 needs --identity_weights"):
        cfg.validate()
    cfg.model.identity_weights = str(iresnet_onnx[0])
    cfg.model.image_size = cfg.data.image_size = 64
    model = build_model(cfg.validate().model)
    assert model.identity_net is not None
    assert _run(model, _batch(2, 64)).identity_cos.shape == (2,)


# --------------------------------------------------------------------------- bookkeeping


def test_signature_and_flops() -> None:
    cfg = ModelConfig()
    sig = model_signature(cfg)
    assert sig == {
        "encoder": "cnn",
        "iresnet_depth": None,
        "feature_dim": 512,
        "num_control_layers": 3,
        "image_size": 112,
        "base_channels": 32,
        "generator": "warp",
        "fill_seed": "copy",
        "seen_side": "spread",
        "head_shape": "learned",
        "head_proxy": "skull_jaw",
    }
    plain = model_signature(ModelConfig(generator="plain"))
    assert plain["fill_seed"] is plain["seen_side"] is plain["head_shape"] is None  # no proxy
    assert plain["head_proxy"] is None
    model = build_model(cfg)
    flops = flops_per_sample(model, 112)
    assert 1e8 < flops < 1e10
    assert flops_per_sample(model, 64) < flops
    assert model.training
    bigger = build_model(dataclasses.replace(cfg, base_channels=64))
    assert flops_per_sample(bigger, 112) > 2 * flops


# --------------------------------------------------------------------------- learning


def _smooth_images(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    low = torch.rand(n, 3, 6, 6, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def _psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    mse = (((pred + 1) / 2 - (target + 1) / 2) ** 2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


def test_default_cnn_overfits_eight_samples() -> None:
    """8 random smooth pairs (source != target, random poses) memorised to > 25 dB in 150 Adam
    steps at 64 px (seen: ~29 dB for several seeds; ~10 s on 2 idle cores)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    size, n, steps = 64, 8, 150
    src, tgt = _smooth_images(n, size, g), _smooth_images(n, size, g)
    src_pose = (torch.rand(n, 3, generator=g) * 2 - 1) * 60
    tgt_pose = (torch.rand(n, 3, generator=g) * 2 - 1) * 60
    model = build_model(ModelConfig(image_size=size, generator="plain"))
    opt = torch.optim.Adam(trainable_parameters(model), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    with torch.no_grad():
        start = _psnr(model.generate(src, src_pose, tgt_pose), tgt)
    for _ in range(steps):
        loss = F.mse_loss(model(src, src_pose, tgt_pose).image, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        end = _psnr(model.generate(src, src_pose, tgt_pose), tgt)
    assert start < 15 and end > 25, (start, end)


# --------------------------------------------------------------------------- warp generator


def test_proxy_flow_is_the_identity_at_the_same_pose() -> None:
    pose = torch.tensor([[0.0, 0.0, 0.0], [35.0, -12.0, 8.0]])
    flow = proxy_flow(pose, pose, 32, 32)
    expected = pixel_grid(32, 32, pose.device).expand(2, -1, -1, -1)
    torch.testing.assert_close(flow.grid, expected, atol=1e-5, rtol=0)
    assert torch.equal(flow.source_head, flow.head)
    assert (flow.visible <= flow.head).all()  # grazing points count as only partly visible
    assert flow.visible[:, :, 16, 16].min() == 1  # the middle of the face faces the camera
    assert 0.25 < flow.head.mean() < 0.6  # the head fills a good part of a head-centred crop


def test_the_jaw_extends_the_proxy_below_the_head_and_turns_with_it() -> None:
    """``head_proxy skull_jaw`` (the default): the silhouette is the head ellipsoid's joined by
    the jaw's, which reaches below the head's (where the chin is); at the same pose the warp is
    still the identity; and turned, the chin's pixels sample the source where the jaw was (a
    rotation of the jaw ellipsoid), not the unmoved source."""
    pose = torch.tensor([[0.0, 0.0, 0.0], [35.0, -12.0, 8.0]])
    jaw = fixed_shape(2, pose.device, "skull_jaw")
    flow = proxy_flow(pose, pose, 32, 32, shape=jaw)
    skull = proxy_flow(pose, pose, 32, 32)
    assert (flow.head >= skull.head).all()
    # row 27's centre (grid y 0.72, i.e. 0.72 crop half-sides below the middle) lies below the
    # head ellipsoid (its bottom at 0.69) and above the jaw's (0.78)
    assert PROXY_RADII[1] - PROXY_CENTER[1] < 27.5 / 16 - 1 < JAW_RADII[1] - JAW_CENTER[1]
    assert skull.head[0, 0, 27].sum() == 0 and flow.head[0, 0, 27].sum() > 0
    expected = pixel_grid(32, 32, pose.device).expand(2, -1, -1, -1)
    torch.testing.assert_close(flow.grid, expected, atol=1e-5, rtol=0)
    assert torch.equal(flow.source_head, flow.head)
    down = torch.tensor([[0.0, -20.0, 0.0]])  # chin down: the chin's pixels sample above them
    turned = proxy_flow(
        torch.zeros(1, 3), down, 32, 32, shape=fixed_shape(1, pose.device, "skull_jaw")
    )
    chin = (turned.head[0, 0] > 0) & (proxy_flow(torch.zeros(1, 3), down, 32, 32).head[0, 0] == 0)
    assert chin.sum() > 0
    pix = pixel_grid(32, 32, pose.device)
    assert (turned.grid[0][chin][:, 1] < pix[chin][:, 1] - 0.02).all()
    with pytest.raises(ValueError, match="head_proxy must be"):
        fixed_shape(1, pose.device, "ellipsoid")


@pytest.mark.parametrize("axis,sign", [(0, 1), (0, -1), (1, 1), (1, -1)])
def test_proxy_flow_moves_the_face_the_way_the_pose_convention_says(axis: int, sign: int) -> None:
    """yaw > 0 turns the nose to the image's right, so a target pixel samples the source to its
    left (grid x < pixel x); pitch > 0 lifts it, so the sample lies below (grid y > pixel y).
    Turning hides some of the source's head: not everything the target shows was visible."""
    target = torch.zeros(1, 3)
    target[0, axis] = 30.0 * sign
    flow = proxy_flow(torch.zeros(1, 3), target, 48, 48)
    head = flow.head[0, 0] > 0
    shift = (flow.grid[0] - pixel_grid(48, 48, target.device))[head]
    if axis == 0:
        assert sign * shift[:, 0].mean() < -0.05
    else:
        assert sign * shift[:, 1].mean() > 0.05
    assert 0 < flow.visible.sum() < flow.head.sum()


@pytest.mark.parametrize("fill_seed", ["copy", "latitude", "head_colour"])
def test_untrained_warp_generator_returns_the_proxy_warp_of_the_source(fill_seed: str) -> None:
    """Zero-initialised mask, flow and gain: the output is the proxy's warp of the source,
    blended by the visibility prior with the fill (here zeroed too, so exactly its seed: the
    source at the hidden point's height on its seen side, the mean colour of its head, or for
    ``copy`` the first copied at no offset, blended with the second by the copy prior)."""
    model = build_model(ModelConfig(image_size=64, fill_seed=fill_seed)).eval()
    with torch.no_grad():
        model.generator.to_rgb[0].weight.zero_()
        model.generator.to_rgb[0].bias.zero_()
    b = _batch(2, 64)
    with torch.no_grad():
        out = model.generate(b["source"], b["source_pose"], b["target_pose"])
    jaw = fixed_shape(2, torch.device("cpu"), "skull_jaw")  # the model's default proxy
    flow = proxy_flow(b["source_pose"], b["target_pose"], 64, 64, with_fill=True, shape=jaw)
    mask = torch.sigmoid(MASK_PRIOR * (2 * flow.visible - 1) * flow.head)
    seen = flow.source_head
    colour = (b["source"] * seen).sum((2, 3), keepdim=True) / seen.sum((2, 3), keepdim=True)
    seed = {"latitude": warp(b["source"], flow.fill_grid), "head_colour": colour}.get(fill_seed)
    if fill_seed == "copy":
        take = torch.sigmoid(torch.tensor(COPY_PRIOR))
        seed = take * warp(b["source"], flow.fill_grid) + (1 - take) * colour
    expected = mask * warp(b["source"], flow.grid) + (1 - mask) * seed
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_copy_fill_learns_where_to_copy_from_within_its_reach() -> None:
    """``copy`` (the default): the image loss reaches the copy flow and the copy mask from the
    first step (their channels start at zero, not saturated), and a hidden point copies the
    source at the seen-side grid moved by at most ``COPY_REACH``."""
    model = build_model(ModelConfig(image_size=64))
    conv = model.generator.to_rgb[0]
    assert model.fill_seed == "copy" and conv.out_channels == 4 * warp_channels("copy")
    b = _batch(2, 64)
    out = model(b["source"], b["source_pose"], b["target_pose"]).image
    (out - b["source"].flip(-1)).pow(2).mean().backward()
    for channel in (7, 8, 9):  # copy offset x, y and the copy mask (PixelShuffle: 4 rows each)
        assert conv.weight.grad[4 * channel : 4 * channel + 4].abs().sum() > 0
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[12:16] = -100.0  # mask: nothing from the proxy warp
        conv.bias[28:36] = 100.0  # copy offset: saturated at +COPY_REACH in x and y
        conv.bias[36:40] = 100.0  # copy mask: all copy
        out = model.generate(b["source"], b["source_pose"], b["target_pose"])
    jaw = fixed_shape(2, torch.device("cpu"), "skull_jaw")  # the model's default proxy
    flow = proxy_flow(b["source_pose"], b["target_pose"], 64, 64, with_fill=True, shape=jaw)
    expected = warp(b["source"], flow.fill_grid + COPY_REACH)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_learned_head_shape_starts_at_the_fixed_proxy_and_moves_within_its_bounds() -> None:
    """``head_shape learned`` (the default): the shape head starts at zero (the fixed proxy,
    exactly), the image loss reaches it from the first step, and saturated it moves the
    ellipsoid's centre by ``SHAPE_CENTRE_REACH`` and scales its radii by
    ``exp(SHAPE_RADII_REACH)``, no further."""
    zero = learned_shape(torch.zeros(2, 6))
    fixed = fixed_shape(2, torch.device("cpu"))
    assert torch.equal(zero.centre, fixed.centre) and torch.equal(zero.radii, fixed.radii)
    model = build_model(ModelConfig(image_size=64))
    b = _batch(2, 64)
    out = model(b["source"], b["source_pose"], b["target_pose"]).image
    (out - b["source"].flip(-1)).pow(2).mean().backward()
    assert model.shape_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.shape_head.bias.fill_(100.0)
        model.generator.to_rgb[0].weight.zero_()
        model.generator.to_rgb[0].bias.zero_()
        model.generator.to_rgb[0].bias[12:16] = 100.0  # mask: all from the proxy warp
        out = model.generate(b["source"], b["source_pose"], b["target_pose"])
    widest = ProxyShape(
        fixed.centre + SHAPE_CENTRE_REACH,
        fixed.radii * math.exp(SHAPE_RADII_REACH),
        fixed_shape(2, torch.device("cpu"), "skull_jaw").jaw,  # the jaw is not learned
    )
    flow = proxy_flow(b["source_pose"], b["target_pose"], 64, 64, shape=widest)
    torch.testing.assert_close(out, warp(b["source"], flow.grid), atol=1e-5, rtol=0)
    assert flow.head.sum() > proxy_flow(b["source_pose"], b["target_pose"], 64, 64).head.sum()


@pytest.mark.parametrize("seen_side", ["clamp", "spread"])
def test_fill_seed_samples_the_source_head_at_the_hidden_points_height(seen_side: str) -> None:
    """Frontal source, head turned 70 deg: the points the source hid are sampled from inside
    the source's head silhouette at their own height (y unchanged in a frontal source), and
    the points it showed well are sampled where the proxy warp samples them."""
    size = 64
    target = torch.tensor([[70.0, 0.0, 0.0]])
    flow = proxy_flow(torch.zeros(1, 3), target, size, size, with_fill=True, seen_side=seen_side)
    head = flow.head[0, 0] > 0
    hidden = head & (flow.visible[0, 0] == 0)
    assert hidden.sum() > 100  # the turned side of the head
    # inside the frontal source's silhouette, the proxy ellipse (x/rx)^2 + ((y+cy)/ry)^2 <= 1
    # (grid y points down); spread looks up to 80 deg round, nearer its edge
    x, y = flow.fill_grid[0][hidden].unbind(-1)
    ellipse = (x / PROXY_RADII[0]) ** 2 + ((y + PROXY_CENTER[1]) / PROXY_RADII[1]) ** 2
    assert ellipse.max() <= 1.0 + 1e-5
    torch.testing.assert_close(flow.fill_grid[0, ..., 1][head], flow.grid[0, ..., 1][head])
    well_seen = head & (flow.visible[0, 0] == 1)
    torch.testing.assert_close(
        flow.fill_grid[0][well_seen], flow.grid[0][well_seen], atol=1e-5, rtol=0
    )


def test_spread_looks_nearer_the_silhouette_the_further_round_a_point_is() -> None:
    """``seen_side spread`` (the default): in a frontal source a hidden point at longitude L is
    looked for at ``x = rx * ring * sin(L')``, where ``clamp`` has ``L' = 55 deg`` for all of
    them and ``spread`` a ``L'`` between 55 and 80 deg that grows, in order, with ``L``."""
    target = torch.tensor([[70.0, 0.0, 0.0]])
    clamp, spread = (
        proxy_flow(torch.zeros(1, 3), target, 64, 64, with_fill=True, seen_side=side)
        for side in ("clamp", "spread")
    )
    hidden = (clamp.head[0, 0] > 0) & (clamp.visible[0, 0] == 0)
    ratio = spread.fill_grid[0, ..., 0][hidden].abs() / clamp.fill_grid[0, ..., 0][hidden].abs()
    top = math.sin(math.radians(80.0)) / math.sin(math.radians(55.0))
    assert ratio.min() > 1 - 1e-4 and ratio.max() < top + 1e-4
    assert ratio.max() > 1.1  # the far side reaches well into the band
    row = hidden[32]  # the middle row: hidden points left to right, further round each time
    xs = spread.fill_grid[0, 32, :, 0][row]
    assert (xs.diff() * xs.diff()[0].sign() >= -1e-6).all()
    with pytest.raises(ValueError, match="seen_side must be"):
        proxy_flow(torch.zeros(1, 3), target, 8, 8, with_fill=True, seen_side="mirror")


def test_configs_written_before_the_warp_generator_load_as_plain_arcface() -> None:
    stored = TrainConfig().to_dict()
    del stored["model"]["generator"], stored["data"]["framing"]
    del stored["optim"]["background_loss_weight"], stored["model"]["fill_seed"]
    del stored["model"]["head_shape"], stored["model"]["seen_side"]
    del stored["model"]["head_proxy"]
    cfg = TrainConfig.from_dict(stored)
    assert (cfg.model.generator, cfg.data.framing) == ("plain", "arcface")
    assert cfg.model.fill_seed == "head_colour"  # a warp model of then filled from the mean
    assert cfg.model.head_shape == "fixed"  # ... with the one proxy ellipsoid
    assert cfg.model.seen_side == "clamp"  # ... hidden points all at the seen-side limit
    assert cfg.model.head_proxy == "skull"  # ... and no jaw
    assert cfg.optim.background_loss_weight == 1.0  # the old loss: every pixel counts
    plain = build_model(cfg.model)
    assert plain.generator.to_rgb[0].out_channels == 12  # the seed's layout: old files load
    assert TrainConfig.from_dict(TrainConfig().to_dict()).model.generator == "warp"


def test_warp_generator_needs_head_framing() -> None:
    cfg = TrainConfig()
    cfg.data.framing = "arcface"
    with pytest.raises(ConfigError, match="--generator warp needs --framing head"):
        cfg.validate()
    cfg.model.generator = "plain"
    cfg.validate()


def test_weights_of_another_fill_are_refused_by_name() -> None:
    """The fill decides the warp head's channels: resuming head-colour weights into a copy
    model names the flag; a file from before the signature recorded the fill still loads
    into the model its stored config builds."""
    from controlnet_ray.checkpoint import CheckpointError, check_model_compat
    from controlnet_ray.model import model_signature

    old_cfg, new_cfg = (
        ModelConfig(image_size=64, fill_seed="head_colour"),
        ModelConfig(image_size=64),
    )
    old = build_model(old_cfg)
    state = {"model_state_dict": old.state_dict(), "model_signature": model_signature(old_cfg)}
    with pytest.raises(CheckpointError, match="fill_seed: checkpoint has 'head_colour', this run"):
        check_model_compat(state, build_model(new_cfg), model_signature(new_cfg))
    del state["model_signature"]["fill_seed"]
    check_model_compat(state, old, model_signature(old_cfg))


def test_weights_of_another_head_shape_are_refused_by_name() -> None:
    """A fixed-proxy model has no shape head: resuming its weights into a learned-shape model
    names the flag, not a missing tensor."""
    from controlnet_ray.checkpoint import CheckpointError, check_model_compat
    from controlnet_ray.model import model_signature

    old_cfg, new_cfg = ModelConfig(image_size=64, head_shape="fixed"), ModelConfig(image_size=64)
    old = build_model(old_cfg)
    assert old.shape_head is None
    state = {"model_state_dict": old.state_dict(), "model_signature": model_signature(old_cfg)}
    with pytest.raises(CheckpointError, match="head_shape: checkpoint has 'fixed', this run"):
        check_model_compat(state, build_model(new_cfg), model_signature(new_cfg))


def test_proxy_geometry_is_float32_under_autocast() -> None:
    """bf16 autocast must not reach the ray casting: in bf16 the discriminant cancels to 0 at
    silhouette pixels (NaN gradients on an H200 at batch 1024) and grids lose precision."""
    from controlnet_ray.model.warp import ProxyShape, fixed_shape, proxy_flow

    g = torch.Generator().manual_seed(0)
    src, tgt = (
        (torch.rand(6, 3, generator=g) - 0.5) * 120,
        (torch.rand(6, 3, generator=g) - 0.5) * 120,
    )
    base = fixed_shape(6, torch.device("cpu"))
    shape = ProxyShape(base.centre.bfloat16(), base.radii.bfloat16())
    plain = proxy_flow(src, tgt, 16, 16, with_fill=True, shape=shape.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = proxy_flow(src, tgt, 16, 16, with_fill=True, shape=shape)
    for name in ("grid", "visible", "fill_grid"):
        a, b = getattr(plain, name), getattr(cast, name)
        assert b.dtype == torch.float32 and torch.equal(a, b), name
