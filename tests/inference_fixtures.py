"""Session fixtures for the inference commands: a tiny dataset and a tiny trained checkpoint.

The checkpoint is trained in pure PyTorch (``engine.TrainEngine``, no Ray) for a few steps on
pairs from the tiny synthetic dataset's shards and saved with ``checkpoint.build_checkpoint`` /
``atomic_save`` exactly like training saves, so the commands are tested on a real file.
``tests/conftest.py`` registers this module as a plugin, so the session fixtures are built once
for the whole run; test modules import only the helper functions they call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TINY_IMAGE_SIZE = 32
TINY_STEPS = 6


@dataclass(frozen=True)
class TinyData:
    """A rendered dataset in the original layout, and a cache folder for its shards."""

    root: Path
    data_dir: Path
    cache_dir: Path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    """4 synthetic identities x 6 video frames at 96 px (about 1 s to render)."""
    from controlnet_ray.data.synthetic import SyntheticSpec, render_dataset

    base = tmp_path_factory.mktemp("tiny_data")
    spec = SyntheticSpec(num_identities=4, frames_per_identity=6, seed=0, image_px=96)
    data_dir = render_dataset(base / "repo", spec)
    return TinyData(base / "repo", data_dir, base / "cache")


def tiny_config(data: TinyData):  # noqa: ANN201 - TrainConfig, imported lazily
    from controlnet_ray.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

    return TrainConfig(
        data=DataConfig(
            data_dir=str(data.data_dir),
            image_size=TINY_IMAGE_SIZE,
            batch_size=4,
            num_workers=1,
            cache_dir=str(data.cache_dir),
        ),
        model=ModelConfig(
            image_size=TINY_IMAGE_SIZE,
            feature_dim=16,
            base_channels=8,
            encoder="cnn",
            num_control_layers=2,
        ),
        optim=OptimConfig(epochs=1, lr=2e-3, warmup_epochs=0),
    ).validate()


def _train_batch(shards_dir: Path, cfg) -> dict:  # noqa: ANN001
    import torch

    from controlnet_ray.data.decode import decode_image
    from controlnet_ray.data.pairs import make_pairs
    from controlnet_ray.data.shards import read_shard_table

    rows = read_shard_table(shards_dir, "train").to_pydict()
    pairs = make_pairs(rows, cfg.data.pair_mode, 5.0, 90.0)[:8]
    poses = np.array(
        [[rows[a][i] for a in ("yaw", "pitch", "roll")] for i in range(len(rows["yaw"]))]
    )

    def images(col: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([decode_image(rows["image"][i]) for i in pairs[:, col]]))

    return {
        "source": images(0),
        "target": images(1),
        "source_pose": torch.from_numpy(poses[pairs[:, 0]]).float(),
        "target_pose": torch.from_numpy(poses[pairs[:, 1]]).float(),
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data: TinyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``best_model.pth`` of a tiny cnn ImageControlNet after a few optimiser steps, with its
    data's single-image pose estimate (``pose_estimate``) as a training run stores it."""
    import torch

    from controlnet_ray.checkpoint import build_checkpoint
    from controlnet_ray.data.shards import ensure_shards
    from controlnet_ray.engine import TrainEngine, build_optimizer, resolve_amp
    from controlnet_ray.files import atomic_save
    from controlnet_ray.launcher.trainer import pose_estimate
    from controlnet_ray.model import build_model, model_signature

    torch.manual_seed(0)
    cfg = tiny_config(tiny_data)
    shards = ensure_shards(cfg.data, num_workers=1)
    batch = _train_batch(shards, cfg)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    device = torch.device("cpu")
    engine = TrainEngine(model, optimizer, None, cfg.optim, device, resolve_amp(False, device))
    losses = [engine.train_micro_batch(batch).loss for _ in range(TINY_STEPS)]
    assert all(np.isfinite(losses)), losses
    state = build_checkpoint(
        epoch=0,
        model=model,
        optimizer=optimizer,
        scheduler=None,
        cfg=cfg,
        model_signature=model_signature(cfg.model),
        best_val_loss=float(losses[-1]),
        best_val_psnr=0.0,
        train_history=[{"loss": float(losses[-1])}],
        val_history=[],
        engine_state=engine.state_dict(),
        pose_estimate=pose_estimate(shards),
    )
    return atomic_save(state, tmp_path_factory.mktemp("ckpt") / "best_model.pth")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with the export command (in-process)."""
    from controlnet_ray import export

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export.main(["--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


def cli_args(*flags: str, **options: object) -> list[str]:
    """argv from ``cli_args("--aligned", image=p, yaw=30, sweep=["yaw=..", ".."])``.

    Each option becomes ``--name value``; a list value repeats the option once per item.
    """
    argv = [str(f) for f in flags]
    for name, value in options.items():
        for item in value if isinstance(value, list) else [value]:
            argv += [f"--{name}", str(item)]
    return argv


def aligned_face(size: int = TINY_IMAGE_SIZE) -> np.ndarray:
    """InsightFace's aligned 112x112 sample face (Tom Hanks), resized to ``size``."""
    import cv2

    from controlnet_ray.inference import read_image

    rgb = read_image(insightface_image("Tom_Hanks_54745.png"))
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def insightface_image(name: str) -> Path:
    """A sample image shipped inside the insightface package (t1.jpg, Tom_Hanks_54745.png)."""
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / name
    assert path.is_file(), f"insightface no longer ships {path}"
    return path


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    import cv2

    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), path
    return path


def dlib_ready() -> bool:
    from controlnet_ray.data.detect import dlib_available

    return dlib_available()


needs_dlib = pytest.mark.skipif(
    not dlib_ready(),
    reason="dlib-bin + face-recognition-models not installed (pip install dlib-bin "
    "face-recognition-models)",
)

__all__ = [
    "TINY_IMAGE_SIZE",
    "TinyData",
    "aligned_face",
    "cli_args",
    "insightface_image",
    "needs_dlib",
    "tiny_checkpoint",
    "tiny_config",
    "tiny_data",
    "tiny_onnx",
    "write_rgb",
]
