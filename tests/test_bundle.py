"""The offline install bundle (scripts/bundle.py): the slim Ray wheel, then build and install.

The fast tests check the wheel surgery on a tiny wheel built here. The slow one builds a real
bundle for this interpreter (torch left out, as for a GPU image that brings its own), installs
it with ``--no-index`` into a fresh venv and runs there what a GPU machine runs after installing
one: ``benchmarks/gpu_path.py`` (engine, Ray Data pipeline, Ray Train path), in its tiny CPU
mode, so the one Ray training run covers both the bundle and the benchmark.

A GPU image already has torch with its dependencies; the fresh venv gets that by a ``.pth``
file naming a folder of links to exactly the torch/torchvision distributions (and what they
require) of the venv running the tests, so every other package must come from the bundle.
"""

from __future__ import annotations

import csv
import importlib.metadata as md
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.train_helpers import train_env

ROOT = Path(__file__).resolve().parents[1]


def _load_bundle():
    spec = importlib.util.spec_from_file_location("bundle_script", ROOT / "scripts" / "bundle.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bundle = _load_bundle()


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel ``demo 1.0`` holding ``files`` and a correct RECORD."""
    info = "demo-1.0.dist-info"
    files = {
        **files,
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    rows = [[n, bundle.record_hash(d), str(len(d))] for n, d in files.items()]
    rows.append([f"{info}/RECORD", "", ""])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    wheel = path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", out.getvalue())
    return wheel


def test_strip_wheel_drops_files_and_their_record_lines(tmp_path: Path) -> None:
    wheel = make_wheel(
        tmp_path,
        {
            "demo/__init__.py": b"VALUE = 7\n",
            "demo/jars/big.jar": b"x" * 1000,
            "demo/jars/other.jar": b"y" * 10,
            "demo/jarsish.py": b"KEPT = True\n",  # shares the prefix's text, not its folder
        },
    )
    assert bundle.record_problems(wheel) == []
    assert bundle.strip_wheel(wheel, "demo/jars/") == (2, 1010)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        record = z.read("demo-1.0.dist-info/RECORD").decode()
    assert not any(n.startswith("demo/jars/") for n in names)
    assert "demo/jarsish.py" in names and "jars/" not in record
    assert bundle.record_problems(wheel) == []
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],  # fmt: skip
        check=True,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
    )
    assert (target / "demo" / "__init__.py").read_text() == "VALUE = 7\n"
    assert not (target / "demo" / "jars").exists()


def test_strip_wheel_without_matches_leaves_the_file(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, {"demo/__init__.py": b""})
    before = wheel.read_bytes()
    assert bundle.strip_wheel(wheel, "demo/jars/") == (0, 0)
    assert wheel.read_bytes() == before


def test_record_problems_names_a_tampered_file(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, {"demo/__init__.py": b"A = 1\n"})
    with zipfile.ZipFile(wheel, "a") as z:
        z.writestr("demo/extra.py", b"")
    assert bundle.record_problems(wheel) == ["demo/extra.py: not in RECORD"]


def test_manylinux_tags_include_the_older_ones() -> None:
    tags = bundle.expand_platform("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-4] == "manylinux_2_5_x86_64"
    assert tags[-3:] == ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
    assert bundle.expand_platform("manylinux2014_aarch64")[0] == "manylinux_2_17_aarch64"
    assert bundle.expand_platform("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_requirements_follow_the_chosen_extras() -> None:
    metadata = (
        "Provides-Extra: cpu\nProvides-Extra: gpu\n"
        "Requires-Dist: ray[train]==2.60.0\n"
        'Requires-Dist: onnxruntime>=1.19; extra == "cpu"\n'
        'Requires-Dist: onnxruntime-gpu>=1.19; extra == "gpu"\n'
    )
    names = [r.name for r in bundle.project_requirements(metadata, ["gpu"])]
    assert names == ["ray", "onnxruntime-gpu"]
    with pytest.raises(bundle.BundleError, match="no extra 'gpus'"):
        bundle.project_requirements(metadata, ["gpus"])


def test_excludes_read_freeze_lines_and_names(tmp_path: Path) -> None:
    listing = tmp_path / "image.txt"
    listing.write_text("# the image\nNumPy==2.5.2\ntorch_geometric\nfoo[bar]>=1 ; os_name>'a'\n")
    got = bundle.read_excludes(["PyYAML"], [listing])
    assert got == {"numpy", "torch-geometric", "foo", "pyyaml"}
    with pytest.raises(bundle.BundleError, match="--exclude-from: no such file"):
        bundle.read_excludes([], [tmp_path / "missing.txt"])


def test_a_python_outside_requires_python_is_refused_unless_asked() -> None:
    metadata = "Requires-Python: <3.12,>=3.11\n"
    with pytest.raises(bundle.BundleError, match="--ignore-requires-python"):
        bundle.check_python(metadata, bundle.Target("3.12"), ignore=False)
    bundle.check_python(metadata, bundle.Target("3.12"), ignore=True)
    bundle.check_python(metadata, bundle.Target("3.11"), ignore=False)


# ---------------------------------------------------------------- the real bundle


def torch_closure() -> list[md.Distribution]:
    """torch, torchvision and every installed distribution they require (what an image with
    torch has), from the environment running the tests."""
    todo, seen, out = ["torch", "torchvision"], set(), []
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement whose marker excludes this platform
        out.append(dist)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return out


def torch_view(folder: Path) -> Path:
    """A folder of links to the top-level entries (packages, dist-infos) of torch's closure."""
    folder.mkdir()
    for dist in torch_closure():
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []}:
            if top not in ("..", "__pycache__") and not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    return folder


def fresh_venv_with_torch(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    view = torch_view(path.parent / "torch_view")
    (Path(site) / "torch_view.pth").write_text(f"{view}\n")
    return python


@pytest.mark.slow
def test_bundle_builds_and_installs_offline(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    # cpu extra: the CPU onnxruntime (the gpu extra's onnxruntime-gpu is a larger download)
    # --ray-extras train,tune: Ray without its dashboard packages, as the GPU image's bundle
    assert bundle.main(["--out", str(out), "--extras", "cpu", "--ray-extras", "train,tune"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = {f["name"] for f in manifest["files"]}
    assert not any(n.startswith(("torch-", "torchvision-", "nvidia_")) for n in names)
    assert "not bundled" in manifest["torch"]
    ray = out / manifest["ray"]["wheel"]
    with zipfile.ZipFile(ray) as z:
        assert not [n for n in z.namelist() if n.startswith("ray/jars/")]
    assert bundle.record_problems(ray) == []
    assert manifest["ray"]["bytes_after"] < manifest["ray"]["bytes_before"] - 20 * 2**20

    python = fresh_venv_with_torch(tmp_path / "venv")
    env = {k: v for k, v in train_env(tmp_path).items() if not k.startswith(("PIP_", "PYTHON"))}
    env |= {"PYTHON": str(python), "PIP_NO_COMPILE": "1"}
    done = subprocess.run(
        ["bash", str(out / "install.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ray 2.60.0" in done.stdout
    where = subprocess.run(
        [python, "-c", "import ray, controlnet_ray; print(ray.__file__, controlnet_ray.__file__)"],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path,
    ).stdout  # fmt: skip
    assert all(p.startswith(str(tmp_path / "venv")) for p in where.split()), where
    # What the GPU machine runs after installing the bundle, in its tiny CPU mode: the engine,
    # the Ray Data pipeline and the real Ray Train path, all from the installed bundle.
    result = run_gpu_path_tiny(python, tmp_path, env)
    for part in ("engine", "pipeline", "ray"):
        assert result[part]["samples_per_s"] > 0, part
    assert result["variants"]["channels_last"]["samples_per_s"] > 0
    assert result["engine"]["flops_per_sample"] > 1e8  # fwd + bwd of the default model at 64 px
    assert result["mfu_engine"] is None and result["engine"]["busy_mean"] is None  # CPU: n/a


def run_gpu_path_tiny(python: Path, tmp: Path, env: dict[str, str]) -> dict:
    """benchmarks/gpu_path.py in its tiny CPU mode; its one batch's figures."""
    out = tmp / "gpu_path.json"
    tiny = ["--device", "cpu", "--steps", "3", "--warmup", "1", "--epochs", "2",
            "--pair_mode", "front_to_video",
            "--pipeline_epochs", "1", "--batch_size", "8", "--image_size", "64",
            "--synthetic_identities", "8", "--synthetic_frames", "8",
            "--variants", "channels_last"]  # fmt: skip
    proc = subprocess.run(
        [python, str(ROOT / "benchmarks" / "gpu_path.py"), *tiny, "--json", str(out)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "ray / engine" in proc.stdout and "n/a" in proc.stdout
    (result,) = json.loads(out.read_text())["results"]
    return result


def test_install_script_refuses_another_python(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    folder.mkdir()
    project = folder / "controlnet_ray-0.1.0-py3-none-any.whl"
    bundle.write_install_sh(folder, "2.7", project, with_torch=False, ignore=False)
    done = subprocess.run(
        ["bash", str(folder / "install.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "this bundle is for Python 2.7" in done.stderr


def test_install_script_into_a_folder_of_its_own(tmp_path: Path) -> None:
    """TARGET=DIR (a read-only environment): every wheel --no-deps there, then the import check
    with that folder on PYTHONPATH (the venv running the tests brings controlnet_ray and Ray)."""
    folder = tmp_path / "b"
    folder.mkdir()
    wheel = make_wheel(folder, {"demo/__init__.py": b"VALUE = 7\n"})
    python = "{}.{}".format(*sys.version_info[:2])
    bundle.write_install_sh(folder, python, wheel, with_torch=False, ignore=False)
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    done = subprocess.run(
        ["bash", str(folder / "install.sh")],
        env=env | {"PYTHON": sys.executable, "TARGET": str(site)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (site / "demo" / "__init__.py").read_text() == "VALUE = 7\n"
    assert "installed controlnet-ray" in done.stdout
