"""ImageControlNet: image encoder + U-Net generator + pose control branch + pose head.

* ``encoder`` turns the source face into feature maps at strides 1..16 and a global identity code.
* ``generator`` is a U-Net style decoder (coarsest scale first) that reads those maps as skips, so
  details of the source survive; it never sees poses itself.
* ``control`` is the ControlNet-style branch: it sees the encoder's maps and the source/target
  poses and injects FiLM scale/shift plus an additive feature map into the first
  ``num_control_layers`` decoder scales through zero-initialised projections, so an untrained
  branch leaves the generator's output exactly unchanged while gradients still reach it.
* ``generator="warp"`` (the default) moves pixels instead of averaging them: the encoder's maps
  are warped by the analytic motion of a 3D head proxy from the source to the target pose
  (:mod:`controlnet_ray.model.warp`), so the U-Net's skips carry the *target's* layout; the
  decoder then predicts a residual flow (zero-initialised), a visibility mask and a fill image,
  and the output is ``mask * warp(source, proxy + residual) * gain + (1 - mask) * fill``.
  ``generator="plain"`` is the seed's U-Net (skips in the source's layout), kept for old
  checkpoints and comparison.
* ``pose_head`` regresses (yaw, pitch, roll) / ``POSE_SCALE_DEG`` from an image.
* An optional frozen ArcFace iresnet scores identity (cosine of embeddings); it is kept out of
  ``parameters()`` and ``state_dict()`` so optimisers and checkpoints do not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from controlnet_ray.config import ModelConfig
from controlnet_ray.model.encoders import (
    EncoderFeatures,
    ImageEncoder,
    build_encoder,
    conv_act,
    resolve_encoder,
)
from controlnet_ray.model.iresnet import IResNet, load_iresnet
from controlnet_ray.model.warp import ProxyFlow, face_grid, head_region, proxy_flow, warp

POSE_SCALE_DEG = 90.0
NUM_SCALES = 5  # decoder levels at strides 16, 8, 4, 2, 1
POSE_FEATURES = 21  # sin/cos of source, target and difference (18) + difference / 90 deg (3)
WARP_CHANNELS = 7  # fill RGB, mask logit, residual flow (x, y), log gain of the warped source
MASK_PRIOR = 3.0  # mask logit where the proxy says the source showed (+) / hid (-) the point
#: The residual flow's reach in crop half-sides (tanh-bounded): enough to fix local misfits of
#: the proxy (nose, ears, perspective), too little to pull a turned face back towards the
#: middle, which an image loss otherwise learns (the blur of the conditional mean: at 0.25 the
#: held-out judged yaw error grew from 13 to 18 deg between epochs 12 and 36).
FLOW_RESIDUAL_SCALE = 0.05


@dataclass
class ModelOutput:
    """What ``ImageControlNet.forward`` returns (see docs/CONTRACTS.md)."""

    image: torch.Tensor
    pose_pred: torch.Tensor
    pose_pred_real: torch.Tensor | None = None
    identity_cos: torch.Tensor | None = None
    region: torch.Tensor | None = None  # [B,1,H,W] head pixels of the target pose (loss weight)


@dataclass
class Injection:
    """One control injection: ``h * (1 + scale) + shift + residual`` at one decoder scale."""

    scale: torch.Tensor
    shift: torch.Tensor
    residual: torch.Tensor


def decoder_channels(base_channels: int) -> tuple[int, ...]:
    """Channels of the decoder's tensors, coarsest (stride 16) first.

    The last, full-resolution level is held space-to-depth: ``4 k`` channels at stride 2 stand
    for ``k = max(c / 4, 8)`` channels at stride 1.  Convolutions over a handful of channels at
    full resolution run several times slower per FLOP on CPUs than the same work folded into
    channels, and a 3x3 conv in this form covers a 6x6 full-resolution window.
    """
    c = base_channels
    return (4 * c, 4 * c, 2 * c, c, 4 * max(c // 4, 8))


def decoder_view(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Encoder maps (finest first) as the decoder consumes them: coarsest first, the
    full-resolution one space-to-depth (see ``decoder_channels``)."""
    coarse_first = maps[::-1]
    return [*coarse_first[:-1], F.pixel_unshuffle(coarse_first[-1], 2)]


def decoder_view_channels(map_channels: tuple[int, ...]) -> tuple[int, ...]:
    coarse_first = tuple(reversed(map_channels))
    return (*coarse_first[:-1], 4 * coarse_first[-1])


def encode_poses(source_pose: torch.Tensor, target_pose: torch.Tensor) -> torch.Tensor:
    """Degrees -> [B, 21]: sin/cos of source, target and target-source, plus the raw difference."""
    src, tgt = torch.deg2rad(source_pose), torch.deg2rad(target_pose)
    diff = tgt - src
    parts = [
        torch.sin(src),
        torch.cos(src),
        torch.sin(tgt),
        torch.cos(tgt),
        torch.sin(diff),
        torch.cos(diff),
        diff / math.radians(POSE_SCALE_DEG),
    ]
    return torch.cat(parts, dim=1)


def _zero(module: nn.Conv2d | nn.Linear) -> nn.Module:
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class Generator(nn.Module):
    """U-Net decoder: stride-16 bottleneck (+ identity code) up to full resolution, tanh out.

    Each level adds a 1x1 projection of the encoder map of its scale (the skip) to the
    upsampled coarser level, then applies a 3x3 conv; upsampling is sub-pixel (1x1 conv at the
    coarse scale + PixelShuffle).  It never sees poses: those arrive only as control injections.
    """

    def __init__(
        self,
        map_channels: tuple[int, ...],
        channels: tuple[int, ...],
        feature_dim: int,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        self.channels = channels
        skips = decoder_view_channels(map_channels)
        self.skip = nn.ModuleList(nn.Conv2d(s, c, 1) for s, c in zip(skips, channels, strict=True))
        self.code = nn.Linear(feature_dim, channels[0])
        ups: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(channels[i - 1], 4 * channels[i], 1), nn.PixelShuffle(2))
            for i in range(1, NUM_SCALES - 1)
        ]
        ups.append(nn.Conv2d(channels[-2], channels[-1], 1))  # already stride-2 space-to-depth
        self.up = nn.ModuleList(ups)
        self.blocks = nn.ModuleList(conv_act(c, c) for c in channels)
        self.to_rgb = nn.Sequential(
            nn.Conv2d(channels[-1], 4 * out_channels, 3, padding=1), nn.PixelShuffle(2)
        )

    def forward(
        self, feats: EncoderFeatures, injections: list[Injection] | None = None
    ) -> torch.Tensor:
        """Raw decoder output at full resolution (``out_channels``; no activation)."""
        maps = decoder_view(feats.maps)
        h = self.skip[0](maps[0]) + self.code(feats.code)[:, :, None, None]
        for level in range(NUM_SCALES):
            if level:
                h = self.up[level - 1](h) + self.skip[level](maps[level])
            h = self.blocks[level](F.leaky_relu(h, 0.2))
            if injections is not None and level < len(injections):
                inj = injections[level]
                h = h * (1 + inj.scale[:, :, None, None]) + inj.shift[:, :, None, None]
                h = h + inj.residual
        return self.to_rgb(h)


class ControlBranch(nn.Module):
    """Pose-conditioned branch producing injections for the coarsest ``num_layers`` scales.

    Only the final projections (``zero_maps``, ``zero_films``) start at zero, as in ControlNet,
    so gradients reach them from step one and the rest of the branch learns afterwards.
    """

    def __init__(
        self,
        map_channels: tuple[int, ...],
        dec_channels: tuple[int, ...],
        num_layers: int,
        hidden: int,
    ) -> None:
        super().__init__()
        if not 1 <= num_layers <= NUM_SCALES:
            raise ValueError(f"ModelConfig.num_control_layers must be in 1..5, got {num_layers}")
        skips = decoder_view_channels(map_channels)[:num_layers]
        widths = [max(d // 2, 16) for d in dec_channels[:num_layers]]
        self.pose_mlp = nn.Sequential(
            nn.Linear(POSE_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.map_in = nn.ModuleList(nn.Conv2d(s, w, 1) for s, w in zip(skips, widths, strict=True))
        self.pose_in = nn.ModuleList(nn.Linear(hidden, w) for w in widths)
        self.body = nn.ModuleList(conv_act(w, w) for w in widths)
        self.zero_maps = nn.ModuleList(
            _zero(nn.Conv2d(w, d, 1))
            for w, d in zip(widths, dec_channels[:num_layers], strict=True)
        )
        self.zero_films = nn.ModuleList(
            _zero(nn.Linear(hidden, 2 * d)) for d in dec_channels[:num_layers]
        )

    def forward(
        self, feats: EncoderFeatures, source_pose: torch.Tensor, target_pose: torch.Tensor
    ) -> list[Injection]:
        pose = self.pose_mlp(encode_poses(source_pose, target_pose))
        maps = decoder_view(feats.maps)
        out = []
        for i, body in enumerate(self.body):
            x = self.map_in[i](maps[i]) + self.pose_in[i](pose)[:, :, None, None]
            x = body(F.leaky_relu(x, 0.2))
            scale, shift = self.zero_films[i](pose).chunk(2, dim=1)
            out.append(Injection(scale, shift, self.zero_maps[i](x)))
        return out


class PoseHead(nn.Module):
    """Small CNN: image in [-1, 1] -> (yaw, pitch, roll) / POSE_SCALE_DEG. No BatchNorm, so
    running it on generated images cannot disturb any statistics."""

    def __init__(self, base_channels: int) -> None:
        super().__init__()
        c = base_channels
        self.features = nn.Sequential(
            conv_act(3, max(c // 2, 8), 2),
            conv_act(max(c // 2, 8), c, 2),
            conv_act(c, 2 * c, 2),
            conv_act(2 * c, 4 * c, 2),
            conv_act(4 * c, 4 * c),
        )
        self.head = nn.Sequential(nn.Linear(4 * c, 4 * c), nn.SiLU(), nn.Linear(4 * c, 3))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).mean(dim=(2, 3)))


class ImageControlNet(nn.Module):
    """Generates the source face at the target pose; see the module docstring."""

    def __init__(self, cfg: ModelConfig, identity_weights: str | None = None) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.warp_mode = cfg.generator == "warp"
        self.fill_seed = cfg.fill_seed
        self.encoder: ImageEncoder = build_encoder(cfg)
        dec = decoder_channels(cfg.base_channels)
        out_channels = WARP_CHANNELS if self.warp_mode else 3
        self.generator = Generator(self.encoder.map_channels, dec, cfg.feature_dim, out_channels)
        if self.warp_mode:
            _init_warp_head(self.generator.to_rgb[0])
        self.control = ControlBranch(
            self.encoder.map_channels, dec, cfg.num_control_layers, hidden=4 * cfg.base_channels
        )
        self.pose_head = PoseHead(cfg.base_channels)
        # Plain attribute, not a submodule: frozen, outside parameters()/state_dict().
        self.__dict__["identity_net"] = _load_identity(identity_weights or cfg.identity_weights)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> ImageControlNet:
        """Move/cast the hidden identity network together with the model (.to, .cuda, ...)."""
        super()._apply(fn, recurse)
        if self.identity_net is not None:
            self.identity_net._apply(fn)
        return self

    def generate(
        self,
        source: torch.Tensor,
        source_pose: torch.Tensor,
        target_pose: torch.Tensor,
        use_control: bool = True,
    ) -> torch.Tensor:
        """The generated image only; ``use_control=False`` runs the bare generator."""
        return self._generate(source, source_pose, target_pose, use_control)[0]

    def _generate(
        self,
        source: torch.Tensor,
        source_pose: torch.Tensor,
        target_pose: torch.Tensor,
        use_control: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, head region of the target pose)."""
        _check_inputs(source, source_pose, target_pose)
        feats = self.encoder(source)
        height, width = source.shape[-2:]
        if not self.warp_mode:
            injections = self.control(feats, source_pose, target_pose) if use_control else None
            image = torch.tanh(self.generator(feats, injections))
            return image, head_region(target_pose, height, width).to(image.dtype)
        with_fill = self.fill_seed == "latitude"
        flow = proxy_flow(source_pose, target_pose, height, width, with_fill=with_fill)
        feats = EncoderFeatures([warp(m, flow.grid) for m in feats.maps], feats.code)
        injections = self.control(feats, source_pose, target_pose) if use_control else None
        image = compose(source, flow, self.generator(feats, injections), self.fill_seed)
        return image, flow.head.to(image.dtype)

    def forward(
        self,
        source: torch.Tensor,
        source_pose: torch.Tensor,
        target_pose: torch.Tensor,
        target: torch.Tensor | None = None,
    ) -> ModelOutput:
        image, region = self._generate(source, source_pose, target_pose)
        # Pose head with detached parameters: the pose loss on generated images moves only the
        # generator side.  Done inside forward so DDP sees one ordinary graph.
        params = {k: v.detach() for k, v in self.pose_head.named_parameters()}
        pose_pred = functional_call(self.pose_head, params, (image,))
        pose_pred_real = self.pose_head(target) if target is not None else None
        identity = self._identity_cos(image, target, target_pose)
        return ModelOutput(image, pose_pred, pose_pred_real, identity, region)

    def _identity_cos(
        self,
        image: torch.Tensor,
        target: torch.Tensor | None,
        target_pose: torch.Tensor,
    ) -> torch.Tensor | None:
        """ArcFace cosine of output and target, on face crops where the crops are head-framed
        (ArcFace was trained on aligned faces, a third of a head-framed crop)."""
        net = self.identity_net
        if net is None or target is None:
            return None
        if self.warp_mode:
            grid = face_grid(target_pose, net.input_size).to(image.dtype)
            image, target = warp(image, grid), warp(target, grid)
        with torch.no_grad():
            ref = net(_resize(target, net.input_size))
        emb = net(_resize(image, net.input_size))
        return F.cosine_similarity(emb.float(), ref.float(), dim=1)


def _init_warp_head(conv: nn.Conv2d) -> None:
    """Zero the output channels of mask, residual flow and gain (PixelShuffle puts output
    channel k at conv channels 4k..4k+3): an untrained warp generator returns the proxy's warp
    of the source where the proxy saw it, exactly, and learns corrections from there.  The fill
    channels get the same kernel for all four sub-pixels (ICNR), so the fill starts smooth
    instead of with PixelShuffle's checkerboard."""
    with torch.no_grad():
        conv.weight[12:].zero_()
        conv.bias[12:].zero_()
        for k in range(3):
            conv.weight[4 * k : 4 * k + 4] = conv.weight[4 * k].clone()
            conv.bias[4 * k : 4 * k + 4] = conv.bias[4 * k].clone()


def compose(
    source: torch.Tensor, flow: ProxyFlow, raw: torch.Tensor, fill_seed: str = "latitude"
) -> torch.Tensor:
    """The warp generator's image from its raw decoder output (``WARP_CHANNELS``).

    The fill is a residual on a seed, so what the source could not show starts from the
    person's own hair and skin rather than grey: ``head_colour``, the source head's mean
    colour (the default), or ``latitude``, the source's head at the same height seen from its
    nearest well-seen side (``ProxyFlow.fill_grid``; ``--fill_seed``)."""
    fill = (fill_seed_image(source, flow, fill_seed) + raw[:, 0:3]).clamp(-1.0, 1.0)
    prior = MASK_PRIOR * (2.0 * flow.visible - 1.0) * flow.head
    mask = torch.sigmoid(raw[:, 3:4] + prior.to(raw.dtype))
    residual = FLOW_RESIDUAL_SCALE * torch.tanh(raw[:, 4:6]).permute(0, 2, 3, 1)
    moved = warp(source, flow.grid + residual.to(flow.grid.dtype))
    gain = torch.exp(raw[:, 6:7].clamp(-2.0, 2.0))
    return (mask * (moved * gain + gain - 1.0) + (1.0 - mask) * fill).clamp(-1.0, 1.0)


def fill_seed_image(source: torch.Tensor, flow: ProxyFlow, fill_seed: str) -> torch.Tensor:
    """What the fill starts from (see :func:`compose`)."""
    if fill_seed == "head_colour":
        return head_colour(source, flow)
    if fill_seed == "latitude":
        if flow.fill_grid is None:
            raise ValueError("fill_seed 'latitude' needs proxy_flow(..., with_fill=True)")
        return warp(source, flow.fill_grid)
    raise ValueError(f"fill_seed must be 'latitude' or 'head_colour', got {fill_seed!r}")


def head_colour(source: torch.Tensor, flow: ProxyFlow) -> torch.Tensor:
    """[B,3,1,1] mean colour of the source where the proxy saw the head (its own silhouette)."""
    mask = flow.source_head.to(source.dtype)
    return (source * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp(1.0)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size
    )


def _check_inputs(
    source: torch.Tensor, source_pose: torch.Tensor, target_pose: torch.Tensor
) -> None:
    if source.dim() != 4 or source.shape[1] != 3 or source.shape[-1] % 16 or source.shape[-2] % 16:
        raise ValueError(
            f"source must be [B, 3, H, W] with H, W multiples of 16, got {tuple(source.shape)}"
        )
    for name, pose in (("source_pose", source_pose), ("target_pose", target_pose)):
        if tuple(pose.shape) != (source.shape[0], 3):
            raise ValueError(f"{name} must be [B, 3] degrees, got {tuple(pose.shape)}")


def _load_identity(path: str | None) -> IResNet | None:
    """Frozen, eval-mode ArcFace for the identity metric/loss, or None."""
    if path is None:
        return None
    net = load_iresnet(path)
    net.requires_grad_(False)
    return net.eval()


def build_model(cfg: ModelConfig, identity_weights: str | None = None) -> ImageControlNet:
    """The model for ``cfg`` with freezing applied (prints nothing)."""
    model = ImageControlNet(cfg, identity_weights)
    apply_freezing(model, cfg)
    return model


def apply_freezing(model: ImageControlNet, cfg: ModelConfig) -> None:
    """Set requires_grad from cfg: freeze_generator -> model.generator; freeze_backbone ->
    the encoder's pretrained backbone (and its BatchNorm statistics)."""
    for part in (model.encoder, model.generator, model.control, model.pose_head):
        part.requires_grad_(True)
    model.encoder.set_backbone_frozen(cfg.freeze_backbone)
    if cfg.freeze_generator:
        model.generator.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimiser should receive."""
    return [p for p in model.parameters() if p.requires_grad]


def model_signature(cfg: ModelConfig) -> dict[str, object]:
    """Architecture facts a checkpoint must agree on (used to name mismatches)."""
    kind, _ = resolve_encoder(cfg)
    return {
        "encoder": kind,
        "iresnet_depth": cfg.iresnet_depth if kind == "iresnet" else None,
        "feature_dim": cfg.feature_dim,
        "num_control_layers": cfg.num_control_layers,
        "image_size": cfg.image_size,
        "base_channels": cfg.base_channels,
        "generator": cfg.generator,
    }


def flops_per_sample(model: ImageControlNet, image_size: int) -> float:
    """Forward FLOPs (2 x MACs of Conv2d/ConvTranspose2d/Linear) for one sample with a target,
    counted with forward hooks on a batch of one; for MFU estimates."""
    macs = [0]

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.ConvTranspose2d):
            k = module.out_channels // module.groups * math.prod(module.kernel_size)
            macs[0] += inputs[0].numel() * k
        elif isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs[0] += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs[0] += output.numel() * module.in_features

    modules = list(model.modules())
    if model.identity_net is not None:
        modules += list(model.identity_net.modules())
    handles = [
        m.register_forward_hook(hook)
        for m in modules
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]
    param = next(model.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    pose = torch.zeros(1, 3, device=param.device, dtype=param.dtype)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x, pose, pose, target=x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return 2.0 * macs[0]
