"""Atomic file writes: users' checkpoints and memories are never left half-written.

Every writer here writes to a temporary file in the destination folder, flushes and
fsyncs it, then renames it over the destination (`os.replace` is atomic on POSIX). A
failure at any point (full disk, Ctrl-C) leaves the old file, if any, untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from longmem.errors import LongMemError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise LongMemError(f"cannot write {path}: {e.strerror}; check the path and its permissions") from e
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise LongMemError(f"no space left on the device while writing {path}; free some disk space and retry (nothing was overwritten)") from e
        raise LongMemError(f"cannot write {path}: {e.strerror}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, atomically. Tensors are made contiguous first."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise LongMemError(f"{what} not found: {path}; check the path")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LongMemError(f"{what} {path} is not valid JSON ({e}); the file is corrupt, restore or re-create it") from e


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` as a whole.

    An existing folder is moved aside first and deleted only after the new one is in place,
    so at every moment `path` holds either the complete old or the complete new contents.
    """
    import shutil

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise LongMemError(f"cannot write {path}: {e.strerror}; check the path and its permissions") from e
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp/mkstemp make owner-only modes; use the usual ones
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())
        replace_dir(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise LongMemError(f"no space left on the device while writing {path}; free some disk space and retry (nothing was overwritten)") from e
        raise LongMemError(f"cannot write {path}: {e.strerror}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename folder `src` onto `dst`; an existing `dst` is moved to a hidden name first, then deleted."""
    import shutil
    import uuid

    aside = dst.parent / f".tmp-{dst.name}-old-{uuid.uuid4().hex[:8]}"
    if dst.exists():
        dst.rename(aside)
    os.replace(src, dst)
    shutil.rmtree(aside, ignore_errors=True)


def check_writable(path: str | os.PathLike, what: str, kind: str = "file") -> Path:
    """Fail now, before any work, if `path` cannot be written as a `kind` ("file" or "folder").

    Checks that a file path is not a folder (and a folder path not a file), that its nearest
    existing ancestor is a folder, and that a file can be created there (a real probe, so
    read-only file systems and permissions are both caught). Nothing is left behind.
    """
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise LongMemError(f"{what} {path} is an existing folder; give a file path, e.g. {path / 'out'}")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise LongMemError(f"{what} {path} is an existing file; give a folder path")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LongMemError(f"{what} {path} cannot be created: {parent} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".longmem-write-check-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LongMemError(f"{what} {path} is not writable: cannot create a file in {parent} ({e.strerror or e}); "
                           f"choose a folder you can write to") from e
    return path
