"""`MemoryStore`: the named memories on disk, the LRU of loaded ones, and one lock per name.

Layout (every name passed `auth.check_name`, so it is one plain path component):

    DATA_DIR/NAME/memory.safetensors   the bank (one row), checksummed (`MemoryBank.save`)
    DATA_DIR/NAME/meta.json            {"token_sha256": ..., "created": ...}, written once
    DATA_DIR/.staging-*                a memory being created or deleted (never a valid name)

Durability: the file on disk is always the truth. A new bank is saved atomically (temporary
file, fsync, rename; `longmem.io`) and the folder is fsynced so the rename itself is on disk,
*then* it replaces the loaded copy and the caller acknowledges. A memory is created in a
staging folder and renamed into place, and deleted by renaming it away first, so a crash at
any point leaves each name either complete or absent; `recover()` at start-up removes what a
crash left (staging folders, temporary files).

Loaded banks are kept in RAM up to `max_loaded`, least recently used dropped first; since
the file is always current, dropping one costs nothing (it is re-read on the next use).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from longmem.errors import LongMemError
from longmem.io import atomic_path, read_json, write_json
from longmem.memory import MemoryBank, MemorySpec
from longmem.server.auth import check_name, hash_token, new_token, token_matches

MEMORY_FILE = "memory.safetensors"
META_FILE = "meta.json"
STAGING = ".staging-"


class NotFound(LongMemError):
    """No memory of this name is reachable with the given token (whether or not it exists)."""


class Conflict(LongMemError):
    """A memory of this name already exists."""


@dataclass
class MemoryStats:
    name: str
    tokens_held: int
    """Retrievable tokens in the memory (complete chunks, at most the capacity)."""
    tokens_written: int
    """Tokens ever appended (the memory's stream length; the oldest are evicted past the capacity)."""
    capacity: int
    created: float
    """Unix time of creation."""
    last_write: float
    """Unix time of the last acknowledged write (append, import or creation)."""
    file_bytes: int


def fsync_dir(path: Path) -> None:
    """Make a rename inside folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MemoryStore:
    def __init__(self, root: str | os.PathLike, spec: MemorySpec, device, max_loaded: int = 64,
                 retriever: str = "exact"):
        self.root = Path(root)
        self.spec = spec
        self.device = device
        self.retriever = retriever  # search backend of every bank loaded
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, MemoryBank] = OrderedDict()  # LRU: most recent last
        self._lock = threading.Lock()   # guards _loaded and creation/deletion
        self._name_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LongMemError(f"--data-dir {self.root} cannot be created ({e.strerror}); choose a folder you can "
                               f"write to") from e
        if not self.root.is_dir():
            raise LongMemError(f"--data-dir {self.root} is a file; give a folder")

    # ---- start-up -----------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Remove what an interrupted write left: staging folders and temporary files. Returns their names."""
        removed = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(STAGING):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
            elif p.is_dir():
                for tmp in p.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed.append(f"{p.name}/{tmp.name}")
        return removed

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / META_FILE).is_file())

    # ---- access ---------------------------------------------------------------------------
    def lock(self, name: str) -> asyncio.Lock:
        """The lock that serialises every request on memory `name` (event-loop side)."""
        lock = self._name_locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._name_locks[name] = lock
        return lock

    def authorize(self, name: str, token: str | None) -> None:
        """Raise NotFound unless `token` opens memory `name`; the same steps and answer for a missing memory."""
        check_name(name)
        meta = self.root / name / META_FILE
        try:
            stored = read_json(meta, "memory metadata")["token_sha256"] if meta.is_file() else None
        except (LongMemError, KeyError, TypeError):
            stored = None
        if not token_matches(token, stored):
            raise NotFound(f"no memory {name!r} is accessible with this token; check the name and the token "
                           f"(Authorization: Bearer <token>)")

    def create(self, name: str) -> str:
        """Make an empty memory `name`; returns its access token (the only time it is shown)."""
        check_name(name)
        token = new_token()
        with self._lock:
            if (self.root / name).exists():
                raise Conflict(f"a memory named {name!r} already exists; choose another name")
            staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=self.root))
            try:
                MemoryBank(self.spec, 1).save(staging / MEMORY_FILE)
                write_json(staging / META_FILE, {"token_sha256": hash_token(token), "created": time.time()})
                os.chmod(staging, 0o755)
                os.rename(staging, self.root / name)
                fsync_dir(self.root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return token

    def get(self, name: str) -> MemoryBank:
        """The loaded bank of `name` (read from disk if not in RAM). Callers must not modify it: `put` a copy."""
        with self._lock:
            bank = self._loaded.get(name)
            if bank is not None:
                self._loaded.move_to_end(name)
                return bank
        path = self.root / name / MEMORY_FILE
        if not path.is_file():
            raise NotFound(f"no memory {name!r} is accessible with this token; check the name and the token "
                           f"(Authorization: Bearer <token>)")
        bank = MemoryBank.load(path, self.device, expect=self.spec, retriever=self.retriever)
        self._remember(name, bank)
        return bank

    def put(self, name: str, bank: MemoryBank) -> None:
        """Save `bank` as memory `name`: on disk (atomic, fsynced) before it replaces the loaded copy."""
        folder = self.root / name
        if not (folder / META_FILE).is_file():
            raise NotFound(f"memory {name!r} was deleted meanwhile; nothing was written")
        bank.save(folder / MEMORY_FILE)
        fsync_dir(folder)
        self._remember(name, bank)

    def import_file(self, name: str, data: bytes) -> MemoryBank:
        """Replace memory `name` with the memory file `data`, once it passes every check (checksum, this model)."""
        folder = self.root / name
        with atomic_path(folder / MEMORY_FILE) as tmp:
            tmp.write_bytes(data)
            bank = MemoryBank.load(tmp, self.device, expect=self.spec, retriever=self.retriever)
            if bank.batch_size != 1:
                raise LongMemError(f"the memory file holds {bank.batch_size} rows; a named memory is one sequence "
                                   f"(save one row: memory.select([i]).save(path))")
            if bank.spec != self.spec:
                raise LongMemError(f"the memory file has capacity {bank.spec.capacity} and dtype {bank.spec.dtype}; "
                                   f"this server keeps {self.spec.capacity} tokens in {self.spec.dtype}")
        fsync_dir(folder)
        self._remember(name, bank)
        return bank

    def file(self, name: str) -> Path:
        return self.root / name / MEMORY_FILE

    def delete(self, name: str) -> None:
        """Remove memory `name` (renamed away first, so a crash never leaves half a memory)."""
        with self._lock:
            self._loaded.pop(name, None)
            aside = Path(tempfile.mkdtemp(prefix=STAGING, dir=self.root))
            os.rename(self.root / name, aside / name)
            fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def stats(self, name: str) -> MemoryStats:
        bank = self.get(name)
        meta = read_json(self.root / name / META_FILE, "memory metadata")
        st = (self.root / name / MEMORY_FILE).stat()
        return MemoryStats(name=name, tokens_held=int(bank.sizes[0]), tokens_written=int(bank.written[0]),
                           capacity=bank.spec.capacity, created=meta["created"], last_write=st.st_mtime,
                           file_bytes=st.st_size)

    def loaded(self) -> list[str]:
        """Names of the banks in RAM, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def _remember(self, name: str, bank: MemoryBank) -> None:
        with self._lock:
            self._loaded[name] = bank
            self._loaded.move_to_end(name)
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
