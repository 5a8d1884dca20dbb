"""Writing files: the package's one atomic-write policy and its one strict-JSON cleaning.

A file is written to a hidden temp name beside its target, flushed to disk, renamed over the
target and the rename itself persisted, so a reader (or a crash) sees the old file or the whole
new one.  Checkpoints, judges, histories, datasets, tune state and exports all write this way.
JSON the package writes is strict (no ``NaN``/``Infinity`` tokens, which many readers reject):
:func:`json_safe` turns non-finite numbers into ``null``, :func:`is_finite` is the test.

A leaf module (standard library only; ``torch`` is imported by :func:`atomic_save` alone) so
every layer can use it: ``data`` and ``judging`` without the model, the engine without Ray.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any


def temp_name(path: str | os.PathLike[str], suffix: str = "") -> Path:
    """A hidden, unique name beside ``path`` (``.<name>.<pid>.<random>.tmp<suffix>``): unique
    per process and call so concurrent writers never share one, hidden so listings skip it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


def unused_path(path: str | os.PathLike[str]) -> Path:
    """``path``, or ``path-2``, ``path-3`` ... the first name not taken: where a folder being
    set aside goes without replacing an earlier one."""
    path, n = Path(path), 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Make the finished file ``tmp`` become ``path``: flush its data, rename it over ``path``
    and persist the rename; for writers that need a file name (ONNX export, hard links)."""
    tmp, path = Path(tmp), Path(path)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Run ``write(f)`` on a temp file beside ``path``, fsync, then rename over ``path``.

    Readers (and a crash) see either the old file or the complete new one.  The temp file is
    created with the usual umask-derived permissions (not mkstemp's 0600) so shared save dirs
    stay readable.  A failed write removes the temp file and re-raises; an I/O failure is
    re-raised as an ``OSError`` whose message names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_write_failure(exc):
            errno = getattr(exc, "errno", None)
            raise OSError(errno, f"cannot write {path}: {_first_line(exc)}") from exc
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` that never leaves a truncated file (see :func:`atomic_write`)."""
    import torch  # only here: the rest of this module stays importable without torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def is_finite(value: Any) -> bool:
    """A finite number (int, float, numpy or 0-d torch scalar); False for NaN/inf, ``None``,
    strings and anything else ``float()`` refuses, so metric rows can be filtered without
    type checks."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def json_safe(value: Any) -> Any:
    """Plain JSON values: mappings (keys as ``str``), lists, numpy/torch arrays and scalars as
    Python numbers, NaN/inf as ``None`` (strict JSON has no NaN); anything else as ``str``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        value = value.tolist()
        if isinstance(value, list):
            return json_safe(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def dumps_strict(doc: Any) -> str:
    """Strict JSON text of :func:`json_safe` ``(doc)``: indented, UTF-8 names kept readable."""
    return json.dumps(json_safe(doc), indent=2, ensure_ascii=False, allow_nan=False)


def _is_write_failure(exc: BaseException) -> bool:
    """An I/O failure (full disk, read-only folder): the message must name the file. torch's
    zip writer reports it as ``RuntimeError: [enforce fail at inline_container.cc...]``."""
    return isinstance(exc, OSError) or (
        isinstance(exc, RuntimeError) and "inline_container" in str(exc)
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort (not possible on every OS / filesystem)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
