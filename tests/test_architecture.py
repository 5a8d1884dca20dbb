"""The package's shape, read from the source (no imports run): the layer boundaries the README
states, ``ray.train``'s context in one module, and the README's layout section naming every
module. (No line cap: a module is as long as the one concept it holds.)

Static on purpose: a function-level ``import ray`` inside the engine would pass an import-time
check (``test_engine_import_does_not_load_ray``) and still tie the engine to Ray.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "controlnet_ray"

#: layer -> packages it must never import (anywhere in its modules, at any depth)
BOUNDARIES = {
    "controlnet_ray.engine": ("ray", "controlnet_ray.data", "controlnet_ray.launcher"),
    "controlnet_ray.model": ("ray", "controlnet_ray.data", "controlnet_ray.engine"),
    "controlnet_ray.data": ("controlnet_ray.model", "controlnet_ray.engine"),
    "controlnet_ray.loop": ("ray",),
    "controlnet_ray.judging": ("ray",),
    "controlnet_ray.config": ("ray", "torch", "controlnet_ray.data"),
}

#: the Ray Train per-worker context: only the worker (the loop's Ray host) touches it
TRAIN_CONTEXT = re.compile(
    r"\b(?:train|ray\.train)\.(?:get_context|report|get_checkpoint|get_dataset_shard)\("
)


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (relative resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                out.add(f"{base}.{node.module}" if node.module else base)
            else:
                out.add(node.module or "")
    return out


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _crossings(modules: list[tuple[str, Path]]) -> list[str]:
    bad = []
    for name, path in modules:
        for layer, banned in BOUNDARIES.items():
            if _within(name, layer):
                imported = _imports(name, path)
                bad += [f"{name} imports {m}" for m in sorted(imported) if any(
                    _within(m, b) for b in banned
                )]  # fmt: skip
    return bad


def test_layers_import_only_downwards() -> None:
    assert _crossings(_modules()) == []


def test_the_boundary_check_sees_a_function_level_import(tmp_path: Path) -> None:
    """The check must be able to fail: an engine module importing Ray inside a function."""
    fake = tmp_path / "controlnet_ray" / "engine" / "sneaky.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ray import train\n    from ..data import pairs\n")
    found = _crossings([("controlnet_ray.engine.sneaky", fake)])
    assert found == [
        "controlnet_ray.engine.sneaky imports controlnet_ray.data",
        "controlnet_ray.engine.sneaky imports ray",
    ]


def test_only_the_worker_touches_ray_trains_context() -> None:
    users = [
        name for name, path in _modules() if TRAIN_CONTEXT.search(path.read_text(encoding="utf-8"))
    ]
    assert users == ["controlnet_ray.worker"]


def test_the_readme_layout_names_every_module_and_package() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("\n## Layout\n", 1)[1].split("```")[1]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))
    missing = [
        str(path.relative_to(ROOT))
        for _, path in _modules()
        if path.name not in ("__init__.py", "__main__.py") and path.stem not in words
    ]
    missing += [
        str(d.relative_to(ROOT))
        for d in PACKAGE.rglob("*")
        if d.is_dir() and d.name != "__pycache__" and d.name not in words
    ]
    assert missing == [], "README.md's Layout section does not mention these"
