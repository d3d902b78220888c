"""Fetch every text source and write it, split, as plain UTF-8 files with a manifest.

Layout of a prepared folder `out/`:

    out/manifest.json                 every document: id, source, license, chars, split, sha256
    out/<split>/<source>/<name>.txt   one document (split is "train" or "dev", see split.json)
    out/labelled/<set>.tsv            `label<TAB>text`, one example a line
    out/cache/                        the downloaded packages, kept for re-runs

Each source is extracted into a hidden staging folder and renamed into place, then the
manifest is rewritten atomically; the manifest lists only sources that were completely
written, and a source it lists whose files still match their sha256 is skipped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from longmem.data.sources import SOURCES, Extracted, Source
from longmem.errors import LongMemError
from longmem.io import read_json, write_json

SPLIT_FILE = Path(__file__).with_name("split.json")
SPLITS = ("train", "dev")
MANIFEST = "manifest.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Split:
    """The fixed train/dev rule of `split.json` (its "about" field explains it)."""

    dev: frozenset[str]  # document ids that are always dev
    hashed_sources: frozenset[str]  # sources whose documents are also held out by hash
    dev_per_mille: int  # held-out share of those sources, in thousandths

    @classmethod
    def load(cls, path: Path = SPLIT_FILE) -> Split:
        spec = read_json(path, "split file")
        return cls(frozenset(spec["dev"]), frozenset(spec["hashed"]["sources"]), spec["hashed"]["dev_per_mille"])

    def __call__(self, doc_id: str) -> str:
        """"train" or "dev" for the document `doc_id` ("<source>/<name>")."""
        if doc_id in self.dev:
            return "dev"
        hashed = doc_id.split("/", 1)[0] in self.hashed_sources
        return "dev" if hashed and int(_sha256(doc_id.encode())[:8], 16) % 1000 < self.dev_per_mille else "train"


@dataclass
class DocumentEntry:
    id: str  # "<source>/<name>"
    source: str
    license: str
    chars: int
    split: str  # "train" | "dev"
    sha256: str  # of the UTF-8 file

    @property
    def path(self) -> str:
        return f"{self.split}/{self.id}.txt"


@dataclass
class LabelledEntry:
    name: str  # e.g. "vader-movies"
    source: str
    license: str
    examples: int
    sha256: str

    @property
    def path(self) -> str:
        return f"labelled/{self.name}.tsv"


@dataclass
class Manifest:
    """What a prepared folder holds; only completely written sources are listed."""

    sources: list[str] = field(default_factory=list)
    documents: list[DocumentEntry] = field(default_factory=list)
    labelled: list[LabelledEntry] = field(default_factory=list)

    @classmethod
    def load(cls, root: Path) -> Manifest:
        raw = read_json(root / MANIFEST, "manifest")
        return cls(raw["sources"], [DocumentEntry(**d) for d in raw["documents"]], [LabelledEntry(**e) for e in raw["labelled"]])

    def save(self, root: Path) -> None:
        write_json(root / MANIFEST, asdict(self))

    def replaced(self, part: Manifest) -> Manifest:
        """This manifest with everything of `part`'s sources replaced by `part`."""
        return Manifest([s for s in self.sources if s not in part.sources] + part.sources,
                        [d for d in self.documents if d.source not in part.sources] + part.documents,
                        [e for e in self.labelled if e.source not in part.sources] + part.labelled)

    def summary(self) -> dict[str, dict[str, dict[str, int]]]:
        """{source: {split: {"documents": n, "chars": n}}}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for d in self.documents:
            counts = out.setdefault(d.source, {}).setdefault(d.split, {"documents": 0, "chars": 0})
            counts["documents"] += 1
            counts["chars"] += d.chars
        return out


def _is_complete(root: Path, manifest: Manifest, source: str, split: Split) -> bool:
    """Whether `source` is listed and every file of it is present, unchanged and correctly split."""
    if source not in manifest.sources:
        return False
    docs = [d for d in manifest.documents if d.source == source]
    entries = docs + [e for e in manifest.labelled if e.source == source]
    return all(d.split == split(d.id) for d in docs) and all(
        (root / e.path).is_file() and _sha256((root / e.path).read_bytes()) == e.sha256 for e in entries)


def _extract(source: Source, cache: Path) -> Extracted:
    try:
        return source.extract(cache)
    except LongMemError as e:
        raise LongMemError(f"preparing source '{source.name}' failed: {e}") from e
    except (OSError, tarfile.TarError, zlib.error, EOFError, UnicodeDecodeError) as e:
        raise LongMemError(f"preparing source '{source.name}' failed while extracting ({e}); delete {cache} and retry") from e


def _write_source(root: Path, source: Source, split: Split) -> Manifest:
    """Extract `source` into a staging folder, move it into place; its part of the manifest."""
    extracted = _extract(source, root / "cache")
    ids = {f"{source.name}/{name}" for name in extracted.documents}
    if missing := sorted(d for d in split.dev if d.startswith(f"{source.name}/") and d not in ids):
        raise LongMemError(f"{SPLIT_FILE} names dev documents {missing} that source '{source.name}' does not have; fix the file")
    part = Manifest([source.name])
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{source.name}-", dir=root))
    try:
        for name, text in sorted(extracted.documents.items()):
            doc_id, data = f"{source.name}/{name}", text.encode()
            part.documents.append(DocumentEntry(doc_id, source.name, source.license, len(text), split(doc_id), _sha256(data)))
            (staging / part.documents[-1].path).parent.mkdir(parents=True, exist_ok=True)
            (staging / part.documents[-1].path).write_bytes(data)
        for name, examples in sorted(extracted.labelled.items()):
            data = "".join(f"{label}\t{' '.join(text.split())}\n" for label, text in examples if text.strip()).encode()
            part.labelled.append(LabelledEntry(name, source.name, source.license, data.count(b"\n"), _sha256(data)))
            (staging / "labelled").mkdir(exist_ok=True)
            (staging / part.labelled[-1].path).write_bytes(data)
        for split_name in SPLITS:
            shutil.rmtree(root / split_name / source.name, ignore_errors=True)
            if (staging / split_name / source.name).is_dir():
                (root / split_name).mkdir(exist_ok=True)
                os.rename(staging / split_name / source.name, root / split_name / source.name)
        for e in part.labelled:
            (root / "labelled").mkdir(exist_ok=True)
            os.replace(staging / e.path, root / e.path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return part


def prepare(out: str | os.PathLike, sources: list[str] | None = None, show_progress: bool = True) -> Manifest:
    """Fetch and extract the text sources (all of `SOURCES` by default) into `out`.

    Idempotent: a source the manifest lists as complete, with unchanged files, is skipped.
    A source that fails raises `LongMemError` naming it; sources finished before it stay.
    """
    root = Path(out)
    names = list(SOURCES) if sources is None else sources
    if unknown := [n for n in names if n not in SOURCES]:
        raise LongMemError(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    split = Split.load()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LongMemError(f"cannot create {root}: {e.strerror}; choose a writable output folder") from e
    for stale in root.glob(".staging-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    manifest = Manifest.load(root) if (root / MANIFEST).exists() else Manifest()
    for name in (bar := tqdm(names, desc="prepare", unit="source", disable=not show_progress)):
        bar.set_postfix_str(name)
        if _is_complete(root, manifest, name, split):
            continue
        manifest = manifest.replaced(_write_source(root, SOURCES[name], split))
        manifest.save(root)
    return manifest
