"""What a job installs is what the driver and the workers import.

``jobs/runtime_env.pip.yaml`` is the only install on a stock Ray cluster, so every third-party
package that a run imports when a module loads must be declared there (or be the cluster's
Ray, or the standard library); optional tools (insightface for ``--framing arcface``) are
imported inside the functions that need them. ``constraints.txt`` pins the transitive set the
tests ran with.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "controlnet_ray"
# What `python -m controlnet_ray.train|tune` loads, and what Ray loads on the workers.
ENTRY_MODULES = ("controlnet_ray.train", "controlnet_ray.tune", "controlnet_ray.worker")
PROVIDED = {"ray"}  # the cluster's own Ray 2.60.0, never installed by a job


def module_file(name: str) -> Path | None:
    """Source file of a controlnet_ray module or package (None: not a module of ours)."""
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def load_time_statements(tree: ast.Module) -> list[ast.stmt]:
    """Statements that run when the module loads: the body and its top-level if/try blocks,
    without ``if TYPE_CHECKING:`` (never runs) and without function or class bodies."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if _is_type_checking(node) or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        out.append(node)
        if isinstance(node, ast.If | ast.Try):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
    return out


def imported_names(node: ast.AST, module: str) -> list[str]:
    """Absolute module names an import statement loads (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parent = module.split(".")[: -node.level]
        base = ".".join([*parent, base] if base else parent)
    # `from controlnet_ray.data import shards` loads the submodule controlnet_ray.data.shards
    return [base, *(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}"))]


def run_imports(entries: tuple[str, ...] = ENTRY_MODULES) -> tuple[set[str], dict[str, set[str]]]:
    """Our modules a run can load (following our imports anywhere, also inside functions),
    and the third-party top-level names each of them imports at load, by module."""
    seen: set[str] = set()
    todo, third = list(entries), {}
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            todo += [n for n in imported_names(node, name) if n.split(".")[0] == PACKAGE]
        for node in load_time_statements(tree):
            for n in imported_names(node, name):
                top = n.split(".")[0]
                if top and top != PACKAGE and top != "__future__":
                    third.setdefault(top, set()).add(name)
    return seen, third


def declared_distributions() -> set[str]:
    """Canonical names of the packages runtime_env.pip.yaml installs (its -c line skipped)."""
    packages = yaml.safe_load((ROOT / "jobs" / "runtime_env.pip.yaml").read_text())["pip"]
    names = set()
    for spec in packages["packages"]:
        try:
            names.add(canonicalize_name(Requirement(spec).name))
        except InvalidRequirement:
            assert spec.startswith("-c "), f"unexpected pip line {spec!r}"
    return names


def undeclared(third: dict[str, set[str]], declared: set[str]) -> dict[str, set[str]]:
    """Top-level import names that are neither stdlib, the cluster's Ray, nor declared."""
    dists = md.packages_distributions()
    out = {}
    for top, users in third.items():
        if top in sys.stdlib_module_names or top in PROVIDED:
            continue
        owners = {canonicalize_name(d) for d in dists.get(top, [top])}
        if not owners & declared:
            out[top] = users
    return out


def test_the_walk_finds_the_driver_modules_and_their_imports():
    modules, third = run_imports()
    for name in ("controlnet_ray.launcher", "controlnet_ray.data.shards", "controlnet_ray.engine"):
        assert name in modules, name
    assert "controlnet_ray.data.shards.align_workers" in third["PIL"]
    assert "torch" in third and "numpy" in third


def test_the_check_catches_an_undeclared_load_time_import():
    declared = declared_distributions()
    assert undeclared({"insightface": {"m"}, "numpy": {"m"}, "json": {"m"}}, declared) == {
        "insightface": {"m"}
    }
    tree = ast.parse("import a\nif TYPE_CHECKING:\n    import b\ndef f():\n    import c\n")
    names = {n for s in load_time_statements(tree) for n in imported_names(s, "x")}
    assert names == {"a"}


def test_every_load_time_import_of_a_run_is_declared_for_the_pip_runtime_env():
    _, third = run_imports()
    missing = undeclared(third, declared_distributions())
    assert not missing, f"imported at load but not in jobs/runtime_env.pip.yaml: {missing}"


@pytest.mark.slow
def test_the_driver_imports_without_insightface_or_dlib():
    """The real import, in a fresh interpreter where insightface and dlib cannot load."""
    modules = sorted(run_imports()[0])
    code = (
        "import sys\n"
        "for blocked in ('insightface', 'dlib', 'face_recognition_models'):\n"
        "    sys.modules[blocked] = None\n"
        f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_arcface_framing_without_insightface_names_the_flag(monkeypatch):
    import numpy as np

    from controlnet_ray.data.align import alignment_matrix
    from controlnet_ray.data.geometry import ARCFACE_TEMPLATE_112

    monkeypatch.setitem(sys.modules, "insightface.utils", None)
    with pytest.raises(ImportError, match="--framing arcface"):
        alignment_matrix(np.asarray(ARCFACE_TEMPLATE_112), 112)


# --- private Ray APIs: guarded, and the guards checked against the pinned Ray ---------------


def test_report_logger_guard_finds_rays_logger_and_tolerates_its_absence():
    import logging

    from controlnet_ray.worker import REPORT_LOG_MODULE, _quiet_report_log

    assert _quiet_report_log() is True
    context = pytest.importorskip(REPORT_LOG_MODULE)
    assert context.logger.getEffectiveLevel() == logging.WARNING  # the logger Ray really uses
    assert _quiet_report_log("ray.train.no_such_module") is False
    assert _quiet_report_log("no_such_package.context") is False


def test_asha_rung_guard_knows_the_pinned_layout_and_refuses_another(tmp_path: Path):
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from controlnet_ray.tune import load_rungs, rung_lists, save_rungs

    asha = AsyncHyperBandScheduler(time_attr="epoch", metric="m", mode="max", max_t=4)
    assert rung_lists(asha._brackets), "Ray's ASHA layout changed: update tune.rung_lists"

    class OtherBracket:  # a Ray whose brackets keep their rungs elsewhere
        rungs = [(1, {})]

    path = tmp_path / "rungs.json"
    assert rung_lists([OtherBracket()]) is None and rung_lists(None) is None
    assert save_rungs([OtherBracket()], str(path)) is False and not path.exists()
    assert save_rungs(asha._brackets, str(path)) is True
    assert load_rungs([OtherBracket()], str(path)) == 0


# --- constraints.txt: the tested transitive set ------------------------------------------------


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_declared_package_within_its_range():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = constraint_pins()
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not pinned: run scripts/constraints.sh"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {req.specifier}"


def test_constraints_match_the_environment_the_tests_run_in():
    """A package upgraded in the venv without rewriting constraints.txt fails here."""
    drift = {}
    for name, version in constraint_pins().items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            continue  # e.g. a GPU image without the CPU-only extras
        if installed != version:
            drift[name] = (version, installed)
    assert not drift, f"constraints.txt vs installed: {drift}; run scripts/constraints.sh"
