"""Image-quality and pose metrics, pure torch, one value per image.

Per-image values (rather than batch means) let evaluation *sum* them, so workers can
all-reduce sums and counts and get exact dataset means whatever the batch split.
Images arrive in the model's range ``[-1, 1]``; the metrics map them to ``[0, 1]`` with
``(x + 1) / 2`` and clamp, so a generator that overshoots is scored on what would be saved.
Everything is computed in float32 whatever the input dtype (bf16 PSNR is meaningless).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_MSE_FLOOR = 1e-10  # identical images score 10*log10(1/1e-10) = 100 dB, never inf
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_SSIM_C1 = 0.01**2  # (K1 * L)^2 with data range L = 1
_SSIM_C2 = 0.03**2
# The face region's default: an ellipse of the 112-px ArcFace-aligned crop (eyes at y~52, nose 72,
# mouth 92; forehead to chin, cheek to cheek of a frontal face), scaled by image_size / 112.
# Callers whose crops are framed differently pass their own mask instead.
FACE_ELLIPSE_112 = (56.0, 68.0, 38.0, 50.0)  # cx, cy, rx, ry of an ArcFace-aligned crop
#: The head of a head-centred crop (``--framing head``): the 3D proxy's silhouette at a frontal
#: pose (``model.warp.PROXY_*``), a little wider for the turned head (cx, cy, rx, ry).
HEAD_ELLIPSE_112 = (56.0, 51.0, 34.0, 44.0)
FACE_REGIONS_112 = {"head": HEAD_ELLIPSE_112, "arcface": FACE_ELLIPSE_112}
SHARPNESS_FLOOR = 1e-12  # a flat target still gives a finite sharpness ratio


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map ``[-1, 1]`` images to float32 ``[0, 1]``, clamping overshoot."""
    return ((x.float() + 1.0) * 0.5).clamp_(0.0, 1.0)


def _check_images(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"expected two [B, C, H, W] image tensors of equal shape, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )


def face_mask(size: int, framing: str) -> torch.Tensor:
    """``[size, size]`` bool: the face region of a crop of this framing (``FACE_REGIONS_112``
    scaled to ``size``). No default framing: it is the data's (its manifest, or the checkpoint's
    ``DataConfig``), and a wrong guess would score another region without a word.

    Pixel centres at ``i + 0.5``. A fixed region (not a segmentation) so every predictor is
    scored on the same pixels.
    """
    if framing not in FACE_REGIONS_112:
        raise ValueError(f"framing must be one of {sorted(FACE_REGIONS_112)}, got {framing!r}")
    cx, cy, rx, ry = (v * size / 112.0 for v in FACE_REGIONS_112[framing])
    c = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over ``[C, H, W]`` per image, or over the ``[H, W]`` mask's pixels (all channels)."""
    if mask is None:
        return x.flatten(1).mean(dim=1)
    if mask.shape != x.shape[-2:] or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool {tuple(x.shape[-2:])}, got {mask.dtype} {tuple(mask.shape)}"
        )
    m = mask.to(x.device, torch.float32)
    if float(m.sum()) == 0:
        raise ValueError("mask selects no pixel")
    return (x * m).sum(dim=(1, 2, 3)) / (m.sum() * x.shape[1])


def psnr_per_image(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """PSNR in dB per image (``[B]``) on ``[0, 1]`` data; 100 dB for identical images.

    The MSE is floored at ``PSNR_MSE_FLOOR`` so a perfect reconstruction gives a finite
    value that can still be summed and averaged (an inf would poison every mean). With
    ``mask`` (bool ``[H, W]``, e.g. :func:`face_mask`) the MSE is taken over its pixels only.
    """
    _check_images(pred, target)
    mse = _masked_mean((to_unit_range(pred) - to_unit_range(target)).pow(2), mask)
    return 10.0 * torch.log10(1.0 / mse.clamp(min=PSNR_MSE_FLOOR))


def laplacian_energy_per_image(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared 3x3 Laplacian of the luma (``[B]``), over ``mask`` when given; [0, 1] data.

    High-frequency energy: an MSE-trained generator that hedges between poses or identities
    outputs blurs, which PSNR rewards and this exposes (a blurred image scores less than its
    original). Border pixels, where the filter would need padding, count as zero.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [B, 3, H, W] images, got {tuple(x.shape)}")
    rgb = to_unit_range(x)
    luma = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=x.device)
    lap = F.pad(F.conv2d(luma, kernel.view(1, 1, 3, 3)), (1, 1, 1, 1))
    return _masked_mean(lap.pow(2), mask)


def _gaussian_kernel_1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _gaussian_blur_valid(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable depthwise Gaussian filter without padding (``valid``), as in Wang et al."""
    channels = x.shape[1]
    g = _gaussian_kernel_1d(size, sigma, x.device)
    x = F.conv2d(x, g.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(x, g.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def ssim_per_image(
    pred: torch.Tensor,
    target: torch.Tensor,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """SSIM per image (``[B]``) with a Gaussian window (11x11, sigma 1.5) on ``[0, 1]`` data.

    Computed on every RGB channel separately and averaged over channels and valid window
    positions (the usual ``skimage``/``pytorch_msssim`` convention with ``channel_axis``),
    not on luminance: colour shifts of the generated face should cost SSIM too.
    Images smaller than the window use a window shrunk to the image's smaller side (kept odd).
    """
    _check_images(pred, target)
    size = min(window_size, pred.shape[-1], pred.shape[-2])
    size = size if size % 2 else size - 1
    if size < 1:
        raise ValueError(f"images too small for SSIM: {tuple(pred.shape)}")
    x, y = to_unit_range(pred), to_unit_range(target)
    b = x.shape[0]
    stats = _gaussian_blur_valid(torch.cat([x, y, x * x, y * y, x * y]), size, sigma)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(b)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + _SSIM_C1) * (2.0 * cov + _SSIM_C2)
    den = (mu_x * mu_x + mu_y * mu_y + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    return (num / den).flatten(1).mean(dim=1)


def pose_abs_error_deg(
    pose_pred: torch.Tensor, target_pose_deg: torch.Tensor, pose_scale_deg: float
) -> torch.Tensor:
    """``|pose_pred * pose_scale_deg - target|`` per image and angle (``[B, 3]``), degrees.

    ``pose_pred`` is in the pose head's normalised units (degrees / ``POSE_SCALE_DEG``);
    the scale is an argument so this module stays independent of the model package.
    """
    if pose_pred.shape != target_pose_deg.shape:
        raise ValueError(
            f"pose shapes differ: pred {tuple(pose_pred.shape)} vs "
            f"target {tuple(target_pose_deg.shape)}"
        )
    if not math.isfinite(pose_scale_deg) or pose_scale_deg <= 0:
        raise ValueError(f"pose_scale_deg must be a positive number, got {pose_scale_deg}")
    return (pose_pred.float() * pose_scale_deg - target_pose_deg.float()).abs()
