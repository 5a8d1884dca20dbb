"""Build an offline install bundle: a folder of wheels that installs controlnet-ray with no index.

Run on a machine that reaches a package index, with the project's venv python (it needs
``packaging`` and pip)::

    .venv/bin/python scripts/bundle.py --out bundle            # for this interpreter/platform
    .venv/bin/python scripts/bundle.py --out bundle-312 --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 --ignore-requires-python

then copy the folder to the node and run ``bash bundle/install.sh`` there (``PYTHON=...`` picks
the interpreter). The folder holds: the project's wheel; every dependency of the project and of
``--extras`` (default ``gpu``) that pip resolves for the target with ``constraints.txt``;
insightface (installed ``--no-deps``, as scripts/env.sh does); and Ray's wheel slimmed:
``ray/jars/`` (the Java worker, ~32 MB compressed, never loaded by Python) removed and its
RECORD rewritten to match. torch and torchvision are left out unless ``--with-torch``: GPU
images bring their own CUDA build. ``--exclude``/``--exclude-from`` leave out what the target
image already has. Beside the wheels: ``install.sh``, ``requirements.txt`` (the wheels' exact
versions), ``manifest.json`` (target, files, sizes, sha256) and ``README.txt``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "controlnet-ray"
TORCH = frozenset({"torch", "torchvision"})
NO_DEPS = "insightface"  # declares opencv-python and onnxruntime, which clash (README)
RAY_STRIP = "ray/jars/"  # the Java worker: not needed by Python
RECORD_SIGNATURES = (".dist-info/RECORD.jws", ".dist-info/RECORD.p7s")


class BundleError(Exception):
    """An expected failure, printed as one line."""


# ---------------------------------------------------------------- wheels and their RECORD


def _record_name(names: list[str]) -> str:
    records = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise BundleError(f"expected one *.dist-info/RECORD in the wheel, found {records}")
    return records[0]


def record_hash(data: bytes) -> str:
    """A RECORD hash field: ``sha256=`` and the urlsafe base64 digest without padding."""
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def strip_wheel(path: Path, prefix: str) -> tuple[int, int]:
    """Rewrite the wheel at ``path`` without the files under ``prefix``; return (files, bytes).

    The RECORD loses exactly the removed files' lines, so pip installs the wheel and
    ``pip uninstall`` knows every file it put down. The file is replaced atomically.
    """
    with zipfile.ZipFile(path) as zin:
        infos = zin.infolist()
        record = _record_name([i.filename for i in infos])
        dropped = [i for i in infos if i.filename.startswith(prefix)]
        if not dropped:
            return 0, 0
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in infos:
                if info.filename.startswith(prefix) or info.filename == record:
                    continue
                zout.writestr(info, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)
            rows = csv.reader(io.StringIO(zin.read(record).decode()))
            kept = [r for r in rows if r and not r[0].startswith(prefix)]
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows(kept)
            zout.writestr(zin.getinfo(record), out.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(path)
    return len(dropped), sum(i.file_size for i in dropped)


def record_problems(path: Path) -> list[str]:
    """Every way the wheel's RECORD disagrees with its files (empty: consistent)."""
    with zipfile.ZipFile(path) as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        record = _record_name(names)
        rows = {r[0]: r for r in csv.reader(io.StringIO(z.read(record).decode())) if r}
        problems = [f"{n}: not in RECORD" for n in names if n not in rows]
        for name, row in rows.items():
            if name == record or name.endswith(RECORD_SIGNATURES):
                continue
            if name not in names:
                problems.append(f"{name}: in RECORD, not in the wheel")
                continue
            data = z.read(name)
            if row[1:3] != [record_hash(data), str(len(data))]:
                problems.append(f"{name}: hash or size differs from RECORD")
    return problems


# ---------------------------------------------------------------- target and requirements


@dataclass
class Target:
    """What the wheels are for: pip's --python-version/--platform/--implementation/--abi."""

    python_version: str | None = None  # None: the running interpreter (and its platform)
    platforms: list[str] = field(default_factory=list)

    def pip_flags(self) -> list[str]:
        if self.python_version is None and not self.platforms:
            return []
        flags = ["--implementation", "cp"]
        if self.python_version:
            flags += ["--python-version", self.python_version]
            flags += ["--abi", "cp" + self.python_version.replace(".", "")]
        for tag in self.platforms:
            flags += ["--platform", tag]
        return flags

    def describe(self) -> dict[str, object]:
        v = sys.version_info
        return {
            "python_version": self.python_version or f"{v.major}.{v.minor}",
            "platforms": self.platforms or [f"this interpreter's, up to {_own_tag()}"],
            "implementation": "cp",
        }


def _own_tag() -> str:
    """The newest manylinux tag this interpreter accepts (its glibc), else its first tag."""
    tags = list(sys_tags())
    return str(next((t for t in tags if t.platform.startswith("manylinux_")), tags[0]))


LEGACY_MANYLINUX = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}


def expand_platform(tag: str) -> list[str]:
    """A manylinux tag and every older one it includes (pip matches --platform exactly).

    ``manylinux_2_28_x86_64`` -> manylinux_2_28 ... manylinux_2_5 and the legacy aliases
    manylinux2014/2010/1 (glibc 2.17/2.12/2.5); other tags are returned as given.
    """
    legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", tag)
    modern = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
    if not (legacy or modern):
        return [tag]
    if legacy:
        glibc, arch = LEGACY_MANYLINUX[legacy[1]], legacy[2]
    else:
        glibc, arch = int(modern[1]), modern[2]
    tags = [f"manylinux_2_{n}_{arch}" for n in range(glibc, 4, -1)]
    tags += [f"{name}_{arch}" for name, n in LEGACY_MANYLINUX.items() if n <= glibc]
    return tags


def project_requirements(metadata: str, extras: list[str]) -> list[Requirement]:
    """The wheel's Requires-Dist for the base install and ``extras``, markers on extras resolved."""
    known = re.findall(r"^Provides-Extra:\s*(\S+)", metadata, re.M)
    unknown = [e for e in extras if e not in known]
    if unknown:
        raise BundleError(f"--extras: the project has no extra {unknown[0]!r} (it has: {known})")
    out = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ["", *extras]):
            req.marker = None
            out.append(req)
    return out


def with_ray_extras(reqs: list[Requirement], args: argparse.Namespace) -> list[Requirement]:
    """``--ray-extras`` in place of the extras the project asks Ray for."""
    if args.ray_extras is not None:
        for req in reqs:
            if canonicalize_name(req.name) == "ray":
                req.extras = {e for e in args.ray_extras.split(",") if e}
    return reqs


def read_excludes(names: list[str], files: list[Path]) -> set[str]:
    """Canonical names to leave out: ``--exclude`` values and lines of ``--exclude-from`` files
    (``pip freeze`` or plain names; ``#`` comments)."""
    out = {canonicalize_name(n) for n in names}
    for path in files:
        if not path.is_file():
            raise BundleError(f"--exclude-from: no such file: {path}")
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.add(canonicalize_name(re.split(r"[=<>!~ \[;@]", line, maxsplit=1)[0]))
    return out


def constraint_pin(constraints: Path, name: str) -> str | None:
    """The ``==`` version constraints.txt pins for ``name``, if any."""
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and "==" in line:
            pkg, version = line.split("==", 1)
            if canonicalize_name(pkg) == canonicalize_name(name):
                return version.strip()
    return None


# ---------------------------------------------------------------- pip


def run_pip(args: list[str], what: str) -> None:
    """Run ``python -m pip ARGS``; a failure becomes one line naming the package pip lacked."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0:
        return
    text = proc.stderr + proc.stdout
    missing = re.search(r"No matching distribution found for (\S+)", text)
    if missing:
        raise BundleError(
            f"{what}: no wheel of {missing[1]} for this target (only wheels are bundled; "
            "check --python-version/--platform, or --exclude it if the target has it)"
        )
    conflict = re.search(r"Cannot install (\S+) because", text)
    if conflict:
        raise BundleError(
            f"{what}: no wheels for this target satisfy {conflict[1]} (no wheel of the pinned "
            "version for this Python/platform, or its dependencies' pins conflict); check "
            "--python-version/--platform, or --exclude it if the target has it"
        )
    last = [ln for ln in text.strip().splitlines() if ln.strip() and "WARNING" not in ln][-3:]
    raise BundleError(f"{what} failed: " + " | ".join(ln.strip() for ln in last))


def build_project_wheel(dest: Path) -> Path:
    """The project's own wheel (pure Python), built from this checkout."""
    run_pip(["wheel", "--no-deps", "-q", "-w", str(dest), str(ROOT)], "building the project wheel")
    wheels = sorted(dest.glob("controlnet_ray-*.whl"))
    if len(wheels) != 1:
        raise BundleError(f"building the project wheel gave {[w.name for w in wheels]}")
    return wheels[0]


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def check_python(metadata: str, target: Target, ignore: bool) -> None:
    """Fail early when the project's Requires-Python excludes the target's Python."""
    found = re.search(r"^Requires-Python:\s*(.+)$", metadata, re.M)
    version = str(target.describe()["python_version"])
    if found and version not in SpecifierSet(found[1].strip()) and not ignore:
        raise BundleError(
            f"controlnet-ray declares Requires-Python {found[1].strip()}, the target is "
            f"Python {version}: pass --ignore-requires-python to bundle (and install) it anyway"
        )


# ---------------------------------------------------------------- the bundle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="bundle folder (must not exist)")
    p.add_argument("--python-version", default=None, help="e.g. 3.12 (default: this python)")
    p.add_argument(
        "--platform",
        action="append",
        default=[],
        help="e.g. manylinux_2_28_x86_64 (older manylinux tags it includes are added); "
        "repeatable; default: this machine's",
    )
    p.add_argument("--extras", default="gpu", help="comma-separated project extras ('' for none)")
    p.add_argument(
        "--ray-extras",
        default=None,
        help="Ray's extras instead of the project's (train,tune,default); 'train,tune' leaves "
        "out the dashboard's packages (no dashboard, no 'ray job submit' on that node)",
    )
    p.add_argument("--with-torch", action="store_true", help="bundle torch and torchvision too")
    p.add_argument("--no-insightface", action="store_true", help="leave insightface out")
    p.add_argument("--exclude", action="append", default=[], help="a package the target has")
    p.add_argument("--exclude-from", action="append", type=Path, default=[], metavar="FILE")
    p.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    p.add_argument(
        "--ignore-requires-python",
        action="store_true",
        help="bundle for a Python outside the project's Requires-Python (untested there)",
    )
    args = p.parse_args(argv)
    if args.platform and not args.python_version:
        p.error("--platform needs --python-version (the target's interpreter)")
    return args


def download(reqs: list[str], target: Target, args: argparse.Namespace, dest: Path) -> None:
    """pip download: wheels only, for the target, versions from constraints.txt."""
    flags = ["download", "-q", "--only-binary=:all:", "-d", str(dest), *target.pip_flags()]
    run_pip([*flags, "-c", str(args.constraints), *reqs], "pip download")
    if not args.no_insightface and NO_DEPS not in args.excluded:
        pin = constraint_pin(args.constraints, NO_DEPS)
        spec = f"{NO_DEPS}=={pin}" if pin else NO_DEPS
        run_pip([*flags, "--no-deps", spec], f"pip download {spec}")


def wheel_name(path: Path) -> tuple[str, str]:
    name, version, _, _ = parse_wheel_filename(path.name)
    return str(name), str(version)


def drop_excluded(folder: Path, excluded: set[str]) -> list[str]:
    """Remove wheels the target already has (pulled in as dependencies); return their names."""
    gone = []
    for wheel in sorted(folder.glob("*.whl")):
        if wheel_name(wheel)[0] in excluded:
            wheel.unlink()
            gone.append(wheel.name)
    return gone


def slim_ray(folder: Path) -> dict[str, object]:
    """Strip ``ray/jars/`` from the bundled Ray wheel and check its RECORD afterwards."""
    rays = [w for w in folder.glob("ray-*.whl") if wheel_name(w)[0] == "ray"]
    if not rays:
        return {"ray": "not bundled"}
    before = rays[0].stat().st_size
    files, size = strip_wheel(rays[0], RAY_STRIP)
    problems = record_problems(rays[0])
    if problems:
        raise BundleError(f"{rays[0].name}: RECORD inconsistent after slimming: {problems[:3]}")
    return {
        "wheel": rays[0].name,
        "removed": f"{RAY_STRIP} ({files} files, {size} bytes uncompressed)",
        "bytes_before": before,
        "bytes_after": rays[0].stat().st_size,
    }


INSTALL_SH = """#!/usr/bin/env bash
# Install controlnet-ray from this folder alone: no package index, no pip config.
#   PYTHON=/path/to/python bash install.sh    into that interpreter's environment (default python3)
#   TARGET=/tmp/site bash install.sh          every wheel --no-deps into a folder of its own (for a
#                                             read-only environment), then PYTHONPATH=/tmp/site
set -euo pipefail
DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
PY="${{PYTHON:-python3}}"
have="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$have" != "{python}" ]]; then
    echo "install.sh: this bundle is for Python {python}, $PY is Python $have (set PYTHON=)" >&2
    exit 2
fi
# This folder only: pip's config files and PIP_* variables may name other wheel sources.
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIREMENT PIP_TARGET
export PIP_CONFIG_FILE=/dev/null
pip=("$PY" -m pip install -q --no-index --find-links "$DIR" --disable-pip-version-check)
{torch_check}
if [[ -n "${{TARGET:-}}" ]]; then
    # pip does not see the environment's packages from a --target install: no dependency check
    "${{pip[@]}}" --no-deps {ignore_python}--target "$TARGET" "$DIR"/*.whl
    export PYTHONPATH="$TARGET${{PYTHONPATH:+:$PYTHONPATH}}"
else
    "${{pip[@]}}" -r "$DIR/requirements.txt"
    "${{pip[@]}}" --no-deps {ignore_python}"$DIR/{project}"
{no_deps}
fi
"$PY" -c "import controlnet_ray.train, ray, torch; \\
print('installed controlnet-ray; ray', ray.__version__, '; torch', torch.__version__)"
"""

TORCH_CHECK = """if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "install.sh: $PY has no torch and this bundle has none (rebuild it with --with-torch)" >&2
    exit 2
fi"""


def write_install_sh(folder: Path, python: str, project: Path, with_torch: bool, ignore: bool):
    extra = [w for w in folder.glob("*.whl") if wheel_name(w)[0] == NO_DEPS]
    text = INSTALL_SH.format(
        python=python,
        torch_check="" if with_torch else TORCH_CHECK,
        ignore_python="--ignore-requires-python " if ignore else "",
        project=project.name,
        no_deps="\n".join(f'    "${{pip[@]}}" --no-deps "$DIR/{w.name}"' for w in extra),
    )
    path = folder / "install.sh"
    path.write_text(text)
    path.chmod(0o755)


def write_requirements(folder: Path, project: Path) -> None:
    """Exact pins of the wheels installed with their dependencies (all but the project and
    insightface, which go in with --no-deps)."""
    pins = sorted(
        f"{n}=={v}"
        for n, v in map(wheel_name, folder.glob("*.whl"))
        if n not in (canonicalize_name(PROJECT), NO_DEPS)
    )
    (folder / "requirements.txt").write_text("\n".join(pins) + "\n")


def file_entry(path: Path) -> dict[str, object]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest}


def write_manifest(folder: Path, target: Target, args: argparse.Namespace, ray: dict) -> dict:
    files = [file_entry(p) for p in sorted(folder.glob("*.whl"))]
    manifest = {
        "target": target.describe(),
        "extras": [e for e in args.extras.split(",") if e],
        "ray_extras": args.ray_extras or "as the project declares",
        "torch": "bundled" if args.with_torch else "not bundled: the target must have torch",
        "excluded": sorted(args.excluded),
        "ray": ray,
        "total_bytes": sum(int(f["bytes"]) for f in files),
        "files": files,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


README = """controlnet-ray offline bundle for Python {python} ({platforms}).
Install on the node (no package index needed): bash install.sh   (PYTHON=... picks the python)
torch: {torch}. Ray: its wheel without ray/jars/ (the Java worker; Python never loads it).
Files, sizes and sha256 in manifest.json; exact versions in requirements.txt.
"""


def build(args: argparse.Namespace) -> dict:
    target = Target(args.python_version, [t for p in args.platform for t in expand_platform(p)])
    args.excluded = read_excludes(args.exclude, args.exclude_from)
    if args.out.exists():
        raise BundleError(f"--out {args.out} exists; give a new folder")
    extras = [e for e in args.extras.split(",") if e]
    with tempfile.TemporaryDirectory() as tmp:
        project = build_project_wheel(Path(tmp))
        metadata = wheel_metadata(project)
        check_python(metadata, target, args.ignore_requires_python)
        skip = args.excluded | (set() if args.with_torch else TORCH)
        reqs = [str(r) for r in with_ray_extras(project_requirements(metadata, extras), args)]
        reqs = [r for r in reqs if canonicalize_name(Requirement(r).name) not in skip]
        staging = Path(tmp) / "bundle"
        download(reqs, target, args, staging)
        drop_excluded(staging, args.excluded)
        shutil.copy2(project, staging / project.name)
        ray = slim_ray(staging)
        python = str(target.describe()["python_version"])
        write_requirements(staging, project)
        write_install_sh(staging, python, project, args.with_torch, args.ignore_requires_python)
        manifest = write_manifest(staging, target, args, ray)
        (staging / "README.txt").write_text(
            README.format(
                python=python,
                platforms=", ".join(target.describe()["platforms"][:1]),
                torch=manifest["torch"],
            )
        )
        shutil.copytree(staging, args.out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = build(args)
    except BundleError as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 2
    mib = manifest["total_bytes"] / 2**20
    print(f"{args.out}: {len(manifest['files'])} wheels, {mib:.1f} MiB; torch {manifest['torch']}")
    ray = manifest["ray"]
    if "bytes_after" in ray:
        print(f"ray: {ray['bytes_before'] / 2**20:.1f} -> {ray['bytes_after'] / 2**20:.1f} MiB")
    print(f"install on the node: bash {args.out}/install.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
