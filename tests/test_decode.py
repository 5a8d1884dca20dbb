"""Decoding and the one normalisation: uint8 from the pipeline, [-1, 1] floats on the device,
mirroring, errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from controlnet_ray.data.batch import normalise_images, to_model_batch
from controlnet_ray.data.decode import decode_image, decode_pairs, decode_rgb
from controlnet_ray.engine import move_batch


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _images(n: int, size: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_decode_image_is_rgb_chw_in_minus_one_to_one():
    rgb = _images(1)[0]
    out = decode_image(_png(rgb))
    assert out.dtype == np.float32 and out.shape == (3, 16, 16)
    np.testing.assert_allclose(out, rgb.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)


def _batch(n: int = 64) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[np.ndarray]]:
    src, tgt = _images(n), _images(2 * n)[n:]
    poses = np.random.default_rng(1).uniform(-60, 60, (2, n, 3)).astype(np.float32)
    batch = {
        "source": np.array([_png(x) for x in src], dtype=object),
        "target": np.array([_png(x) for x in tgt], dtype=object),
        "source_pose": poses[0],
        "target_pose": poses[1],
    }
    return batch, src, tgt


def test_decode_pairs_without_flip_keeps_images_and_poses():
    batch, src, tgt = _batch(4)
    out = decode_pairs(batch, flip=False)
    np.testing.assert_allclose(out["source"][2], decode_image(batch["source"][2]))
    np.testing.assert_allclose(out["target"][3], tgt[3].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(out["source_pose"], batch["source_pose"])
    assert all(out[k].flags["C_CONTIGUOUS"] for k in ("source", "target"))


def test_pipeline_images_are_uint8_rgb_and_normalised_in_one_place():
    rgb = _images(3)
    raw = decode_rgb([_png(x) for x in rgb])
    assert raw.dtype == np.uint8 and raw.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(raw, np.stack(rgb))
    out = normalise_images(torch.from_numpy(raw))
    assert out.dtype == torch.float32 and out.shape == (3, 3, 16, 16) and out.is_contiguous()
    np.testing.assert_array_equal(out[1].numpy(), decode_image(_png(rgb[1])))
    assert out.min() >= -1 and out.max() <= 1


def test_mirrors_are_fixed_by_the_generator_seed():
    batch, _, _ = _batch(16)
    a = decode_pairs(batch, flip=True, generator=torch.Generator().manual_seed(3))
    b = decode_pairs(batch, flip=True, generator=torch.Generator().manual_seed(3))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_the_engine_refuses_unnormalised_uint8_images():
    raw = {k: torch.zeros(2, 16, 16, 3, dtype=torch.uint8) for k in ("source", "target")}
    raw |= {k: torch.zeros(2, 3) for k in ("source_pose", "target_pose")}
    with pytest.raises(TypeError, match="uint8.*to_model_batch"):
        move_batch(raw, torch.device("cpu"))
    assert move_batch(to_model_batch(raw), torch.device("cpu"))["source"].shape == (2, 3, 16, 16)


def test_mirroring_flips_both_images_and_negates_yaw_and_roll_together():
    batch, src, tgt = _batch(64)
    out = decode_pairs(batch, flip=True, generator=torch.Generator().manual_seed(0))
    plain = decode_pairs(batch, flip=False)
    mirrored = out["source_pose"][:, 0] != plain["source_pose"][:, 0]
    assert 0 < mirrored.sum() < 64  # some of each (seeded, so no coin toss in the test)
    for i in range(64):
        flip = bool(mirrored[i])
        sign = np.array([-1, 1, -1], np.float32) if flip else np.ones(3, np.float32)
        np.testing.assert_array_equal(out["source_pose"][i], plain["source_pose"][i] * sign)
        np.testing.assert_array_equal(out["target_pose"][i], plain["target_pose"][i] * sign)
        for key in ("source", "target"):
            expected = plain[key][i][..., ::-1] if flip else plain[key][i]
            np.testing.assert_array_equal(out[key][i], expected)


def test_undecodable_bytes_raise_instead_of_zeros():
    batch, _, _ = _batch(3)
    batch["target"][1] = b"not an image"
    with pytest.raises(ValueError, match="undecodable image bytes.*image 1 of 3"):
        decode_pairs(batch)
