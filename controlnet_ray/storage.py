"""A run's home in its storage: ``<storage_path>/<run_name>/`` on any pyarrow filesystem.

On a multi-node cluster rank 0 runs on some worker node and the driver on another, so the only
place both can reach is the run's storage (a local path, NFS, ``s3://``, ``gs://``).  Ray keeps
its checkpoints there; this module puts the original's files beside them, under their original
names, and copies them down to the driver's ``--save_dir`` / ``--log_dir``::

    <storage_path>/<run_name>/checkpoint_<timestamp>/state.pth   Ray's checkpoints
    <storage_path>/<run_name>/save_dir/best_model.pth ...        what --save_dir receives
    <storage_path>/<run_name>/log_dir/events.out.tfevents...     what --log_dir receives

Every write is atomic on every filesystem (object stores replace a key whole on close; on a
file system a temp name is renamed over the target), so readers never see half a file.

Nothing here imports ray or torch: the driver, the worker and tests share it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from controlnet_ray.files import atomic_write, publish, temp_name

SAVE_DIR = "save_dir"  # under the run: the files the driver's --save_dir receives
LOG_DIR = "log_dir"  # under the run: the TensorBoard events the driver's --log_dir receives
_CHUNK = 8 << 20  # bytes per read when streaming a file


def is_uri(path: str) -> bool:
    """``s3://...`` / ``gs://...`` (anything with a scheme) rather than a local path."""
    return "://" in path


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` that keeps a URI's query (``?endpoint_override=...``) at the end."""
    head, sep, query = base.partition("?") if is_uri(base) else (base, "", "")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


@dataclass(frozen=True)
class RunStorage:
    """The folder ``<storage_path>/<run_name>`` on its filesystem (``root`` is an fs path)."""

    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, storage_path: str, run_name: str) -> RunStorage:
        """Resolve ``storage_path`` as Ray does (``pyarrow.fs.FileSystem.from_uri``), so the
        filesystem compares equal to Ray's and query options (``endpoint_override``) apply."""
        fs, base = pafs.FileSystem.from_uri(storage_path)
        return cls(fs, f"{base.rstrip('/')}/{run_name}")

    @property
    def is_local(self) -> bool:
        """A plain local or mounted path: files can be hard-linked and renamed."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def put_file(self, local: Path, dest: str, size: int | None = None) -> None:
        """Upload ``local`` (only its first ``size`` bytes when given: a file still being
        appended to, such as a TensorBoard event file, is taken up to a flushed point)."""
        with open(local, "rb") as src:
            self._write(dest, lambda out: _copy_stream(src, out, size))

    def put_bytes(self, data: bytes, dest: str) -> None:
        self._write(dest, lambda out: out.write(data))

    def copy(self, src: str, dest: str) -> None:
        """Copy a file within the storage without passing it through this process (a
        server-side copy on object stores): how one serialised state becomes several files."""
        self.fs.create_dir(_parent(dest))
        if not self.is_local:
            self.fs.copy_file(src, dest)
            return
        if _link_over(Path(src), Path(dest)):  # published files are never changed in place
            return
        tmp = str(temp_name(dest))
        try:
            self.fs.copy_file(src, tmp)
            self.fs.move(tmp, dest)
        except BaseException:
            _delete_quietly(self.fs, tmp)
            raise

    def upload_dir(self, local_dir: Path, dest: str) -> str:
        """Upload every file of ``local_dir`` to the folder ``dest``; returns ``dest``."""
        for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            self.put_file(file, f"{dest}/{file.relative_to(local_dir).as_posix()}")
        return dest

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def files(self, folder: str) -> list[pafs.FileInfo]:
        """Every file under ``folder`` (none when it does not exist)."""
        selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def materialise(self, folder: str, local_dir: Path) -> list[Path]:
        """Mirror the storage folder ``folder`` into ``local_dir`` (files only added or
        replaced, never deleted); returns the local files that changed.

        Local storage is hard-linked (no second copy on disk) where the folders share a
        filesystem; anything else is downloaded. A file is skipped when it is already there
        with the same size and modification time."""
        changed = []
        for info in self.files(folder):
            target = Path(local_dir) / info.path[len(folder) :].lstrip("/")
            if _up_to_date(info, target):
                continue
            self._fetch(info, target)
            changed.append(target)
        return changed

    # -- internals ---------------------------------------------------------------------------
    def _write(self, dest: str, write) -> None:
        self.fs.create_dir(_parent(dest))
        if not self.is_local:  # an object appears whole when its stream closes
            with self.fs.open_output_stream(dest) as out:
                write(out)
            return
        atomic_write(dest, write)

    def _fetch(self, info: pafs.FileInfo, target: Path) -> None:
        if self.is_local and _link_over(Path(info.path), target):
            return
        with self.fs.open_input_stream(info.path) as src:
            atomic_write(target, lambda out: _copy_stream(src, out, None))
        if info.mtime_ns is not None:
            os.utime(target, ns=(info.mtime_ns, info.mtime_ns))


def _copy_stream(src, out, size: int | None) -> None:
    left = size
    while left is None or left > 0:
        chunk = src.read(_CHUNK if left is None else min(_CHUNK, left))
        if not chunk:
            break
        out.write(chunk)
        if left is not None:
            left -= len(chunk)


def _up_to_date(info: pafs.FileInfo, target: Path) -> bool:
    try:
        st = target.stat()
    except FileNotFoundError:
        return False
    if st.st_size != info.size:
        return False
    return info.mtime_ns is None or st.st_mtime_ns == info.mtime_ns


def _link_over(source: Path, target: Path) -> bool:
    """Hard-link ``source`` at ``target`` atomically; False where links are impossible
    (another filesystem, or one without them), so the caller copies instead."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    try:
        os.link(source, tmp)
    except OSError:
        return False
    publish(tmp, target)
    return True


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):
        fs.delete_file(path)
