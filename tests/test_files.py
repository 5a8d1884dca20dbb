"""controlnet_ray.files: the one atomic-write policy and the one strict-JSON cleaning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from controlnet_ray.files import (
    atomic_write_text,
    dumps_strict,
    is_finite,
    json_safe,
    publish,
    temp_name,
)


def test_strict_json_has_no_nan():
    text = dumps_strict({"a": float("nan"), "b": [np.float32(np.inf), 1.5], "c": np.int64(2)})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": 2}


def test_json_safe_takes_tensors_numpy_and_odd_values():
    doc = {
        1: torch.tensor([1.0, math.inf]),
        "s": torch.tensor(3),
        "b": np.bool_(True),
        "p": Path("x"),
    }
    assert json_safe(doc) == {"1": [1.0, None], "s": 3, "b": True, "p": "x"}


@pytest.mark.parametrize(
    ("value", "finite"),
    [(1, True), (np.float32(2.5), True), (torch.tensor(1.0), True), (math.nan, False),
     (-math.inf, False), (None, False), ("1.0x", False), (10**400, False)],
)  # fmt: skip
def test_is_finite(value, finite: bool):
    assert is_finite(value) is finite


def test_atomic_text_replaces_whole_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "néw")
    assert path.read_text(encoding="utf-8") == "néw"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_publish_renames_a_finished_temp_file(tmp_path: Path):
    out = tmp_path / "model.onnx"
    tmp = temp_name(out, suffix=".onnx")
    assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.") and tmp.suffix == ".onnx"
    tmp.write_bytes(b"data")
    assert publish(tmp, out) == out and out.read_bytes() == b"data" and not tmp.exists()
