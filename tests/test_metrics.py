"""PSNR / SSIM / pose-error metrics: exact values on constructed cases and a reference check."""

from __future__ import annotations

import math

import pytest
import torch

from controlnet_ray.metrics import pose_abs_error_deg, psnr_per_image, ssim_per_image


def _images(b: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def test_psnr_identical_is_100_db_and_finite() -> None:
    x = _images()
    psnr = psnr_per_image(x, x.clone())
    assert psnr.shape == (3,)
    assert torch.isfinite(psnr).all()
    assert torch.allclose(psnr, torch.full((3,), 100.0))


def test_psnr_known_value_per_image_and_range_mapping() -> None:
    target = torch.full((2, 3, 8, 8), -1.0)  # 0 in [0, 1]
    pred = target.clone()
    pred[0] += 0.2  # 0.1 in [0, 1] -> MSE 0.01 -> 20 dB
    pred[1] += 0.02  # 0.01 -> MSE 1e-4 -> 40 dB
    assert torch.allclose(psnr_per_image(pred, target), torch.tensor([20.0, 40.0]), atol=1e-4)


def test_psnr_clamps_out_of_range_predictions() -> None:
    target = torch.ones(1, 3, 8, 8)
    assert psnr_per_image(target * 5, target).item() == pytest.approx(100.0)


def test_psnr_bf16_input_is_computed_in_float32() -> None:
    x = _images()
    assert psnr_per_image(x.bfloat16(), x.bfloat16()).dtype == torch.float32


def test_ssim_identical_is_one() -> None:
    x = _images()
    assert torch.allclose(ssim_per_image(x, x.clone()), torch.ones(3), atol=1e-5)


def test_ssim_drops_with_noise_and_is_symmetric() -> None:
    x = _images(b=2)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    s = ssim_per_image(noisy, x)
    assert (s < 0.9).all() and (s > -1).all()
    assert torch.allclose(s, ssim_per_image(x, noisy), atol=1e-6)


def test_ssim_matches_skimage_reference() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    x = _images(b=2, size=24, seed=1)
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    ours = ssim_per_image(y, x)
    for i in range(2):
        ref = metrics.structural_similarity(
            ((y[i] + 1) / 2).permute(1, 2, 0).double().numpy(),
            ((x[i] + 1) / 2).permute(1, 2, 0).double().numpy(),
            data_range=1.0,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)


def test_ssim_small_images_shrink_the_window() -> None:
    x = _images(b=1, size=6)
    s = ssim_per_image(x, x)
    assert math.isfinite(s.item()) and s.item() == pytest.approx(1.0, abs=1e-5)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        psnr_per_image(_images(b=2), _images(b=3))


def test_pose_abs_error_in_degrees() -> None:
    target = torch.tensor([[30.0, -10.0, 5.0]])
    pred = torch.tensor([[40.0, -10.0, -5.0]]) / 90.0
    err = pose_abs_error_deg(pred, target, 90.0)
    assert torch.allclose(err, torch.tensor([[10.0, 0.0, 10.0]]), atol=1e-4)
    with pytest.raises(ValueError, match="pose_scale_deg"):
        pose_abs_error_deg(pred, target, 0.0)


def test_masked_psnr_only_counts_the_mask_and_refuses_bad_masks() -> None:
    from controlnet_ray.metrics import face_mask

    target = torch.zeros(2, 3, 16, 16)
    pred = target.clone()
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:8, 4:8] = True
    pred[..., ~mask] = 0.5  # error only outside the mask
    assert torch.allclose(psnr_per_image(pred, target, mask), torch.full((2,), 100.0))
    with pytest.raises(ValueError, match="mask"):
        psnr_per_image(pred, target, mask.float())
    with pytest.raises(ValueError, match="no pixel"):
        psnr_per_image(pred, target, torch.zeros(16, 16, dtype=torch.bool))
    assert 0.3 < float(face_mask(112, "head").float().mean()) < 0.6


def test_laplacian_energy_is_zero_on_flat_images_and_drops_with_blur() -> None:
    from controlnet_ray.metrics import laplacian_energy_per_image

    flat = torch.full((1, 3, 16, 16), 0.3)
    assert float(laplacian_energy_per_image(flat)) == pytest.approx(0.0, abs=1e-12)
    x = _images(2, 32)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    assert (laplacian_energy_per_image(blurred) < 0.5 * laplacian_energy_per_image(x)).all()
